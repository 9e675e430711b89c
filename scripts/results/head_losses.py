"""Finding 3: head losses at an equal fitting budget, on the default tiny policy.

The policy samples one set of self-distillation sequences (as `specroll fit-heads` does, with the
default config's seed). Fresh heads (seeded) first take `--warm-start` KL steps, once (TV's
gradient vanishes where draft and target barely overlap, so `specroll fit-heads` starts the same
way); a copy of them is then fitted with each loss for the same `--steps` optimiser steps, at the
same learning rate, on the same micro-batches in the same order:

  tv       per-depth total variation, 1 - sum_v min(p, q)
  e2e_tv   end-to-end TV, 1 - (1/K) sum_j prod_{i<=j} alpha_i
  kl       forward KL(p || q)
  ce       cross-entropy on the sampled token

It reports held-out per-depth acceptance sum_v min(p, q) during and after the fit, the accepted
length it predicts (1 + sum_j prod_{i<=j} alpha_i), and the accepted length the engine measures
drafting the full depth on fresh task prompts.

    python scripts/results/head_losses.py        # 150 KL steps, then 450 per loss (the default fit's budget)
    python scripts/results/head_losses.py --warm-start 30 --steps 60 --sequences 256 --micro-batch 16
    python scripts/results/head_losses.py ... --losses kl ce --merge   # add losses to an earlier run's table

With `--merge`, the rows and curves of other losses already in the JSON beside `--out`
(docs/results/head_losses.json) are kept when that run had the same budget (the same warm start, steps and samples: the
fitting is seeded, so the warm start and the batches are the same).

One loss through the CLI: `specroll fit-heads fit.loss=e2e_tv heads_path=DIR`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

from _common import OUT_DIR, load_default, new_figure, sampling, save_figure, task_prompts

LOSSES = ("tv", "e2e_tv", "kl", "ce")


def fit_one(cfg, model, heads, data, loss: str, steps: int, eval_every: int) -> tuple:
    """Fit `heads` in place with `loss` alone: (result of fit_heads, [(step, acceptance)])."""
    import torch

    from learner.refit import fit_heads

    curve = []
    fit, held = data
    result = fit_heads(model, heads, fit[0], prompt_lens=fit[1], eval_sequences=held[0], eval_prompt_lens=held[1],
                       steps=steps, lr=cfg.fit.lr, loss=loss, kl_warmup_steps=0,
                       micro_batch_size=cfg.fit.micro_batch_size, temperature=cfg.sampling.temperature,
                       eval_every=eval_every, generator=torch.Generator().manual_seed(cfg.seed),
                       log_fn=lambda r: curve.append((r["step"], r["acceptance"])))
    return result, curve


def earlier(args) -> tuple[list[dict], dict]:
    """The rows and curves of docs/results/head_losses.json from a run with this budget, losses of this run left out."""
    path = Path(args.out).with_suffix(".json")
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    if (old["steps"], old["warm_start"], old["sequences"]) != (args.steps, args.warm_start, args.sequences):
        raise SystemExit(f"error: {path}: fitted with another budget ({old['steps']} steps after {old['warm_start']} "
                         f"KL, {old['sequences']} samples); run without --merge or with that budget")
    rows = [r for r in old["rows"] if r["loss"] not in args.losses]
    return rows, {r["loss"]: old["curves"][r["loss"]] for r in rows}


def report(rows: list[dict], curves: dict, args) -> None:
    """Print the table and write the JSON and the figure (after every recipe, so a long run keeps what it has)."""
    from spec_heads.depth import expected_tokens

    K = len(rows[0]["acceptance"])
    print(f"\n| loss ({args.warm_start} KL + {args.steps} steps) | " + " | ".join(f"depth {i + 1}" for i in range(K))
          + " | predicted length | engine length |\n|---|" + "---|" * (K + 2))
    for r in rows:
        print(f"| {r['loss']} | " + " | ".join(f"{a:.3f}" for a in r["acceptance"])
              + f" | {r['predicted_len']:.2f} | {r['engine_len']:.2f} |")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"steps": args.steps, "warm_start": args.warm_start, "sequences": args.sequences, "rows": rows,
         "curves": curves}, indent=1))

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        c = curves[r["loss"]]
        ax1.plot([s for s, _ in c], [expected_tokens(a, K) for _, a in c], color=f"C{i}", label=r["loss"])
        ax2.plot(range(1, K + 1), r["acceptance"], marker="o", color=f"C{i}", label=r["loss"])
    if args.warm_start:
        ax1.axvline(args.warm_start, color="grey", ls=":", lw=1)
    ax1.set_xlabel(f"fit step (KL until {args.warm_start}, then each loss)")
    ax1.set_ylabel(f"predicted tokens per verify ({K} depths)")
    ax1.set_title("held-out, during the fit")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("draft depth")
    ax2.set_ylabel("held-out acceptance")
    ax2.set_title(f"after {args.warm_start} + {args.steps} steps")
    save_figure(fig, Path(args.out).name, Path(args.out).parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--warm-start", type=int, default=150, help="KL steps of the shared start (0: none)")
    ap.add_argument("--steps", type=int, default=450, help="optimiser steps per loss after the warm start")
    ap.add_argument("--sequences", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=32, help="sequences per optimiser step (the default fit's)")
    ap.add_argument("--prompts", type=int, default=256, help="fresh task prompts for the engine's accepted length")
    ap.add_argument("--merge", action="store_true", help="keep other losses' rows from the earlier JSON")
    ap.add_argument("--save-tv", default="", help="also save the heads fitted with tv to this folder")
    ap.add_argument("--out", default=str(OUT_DIR / "head_losses.png"))
    args = ap.parse_args()

    import torch

    from experiments.fit_heads import _sample
    from rollout.engine import Engine
    from rollout.types import SpecParams
    from spec_heads.depth import expected_tokens
    from spec_heads.heads import DraftHeads

    cfg, model, _, tok = load_default(with_heads=False)
    cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, num_sequences=args.sequences,
                                                            micro_batch_size=args.micro_batch))
    for p in model.parameters():
        p.requires_grad_(False)
    sequences, prompt_lens = _sample(cfg, model, tok)
    n_eval = max(1, round(cfg.fit.holdout * len(sequences)))
    n_fit = len(sequences) - n_eval
    data = ((sequences[:n_fit], prompt_lens[:n_fit]), (sequences[n_fit:], prompt_lens[n_fit:]))
    # fresh prompts for the engine: another seed than the fit's samples
    prompts = task_prompts(cfg, tok, args.prompts, seed=cfg.seed + 1)
    sp = sampling(cfg, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        start = DraftHeads(cfg.heads, model.config)
    warm = []
    if args.warm_start:
        result, warm = fit_one(cfg, model, start, data, "kl", args.warm_start, args.eval_every)
        print(f"warm start ({args.warm_start} KL steps): acceptance "
              f"{' '.join(f'{a:.3f}' for a in result['acceptance_after'])}", flush=True)
    rows, curves = earlier(args) if args.merge else ([], {})
    for loss in args.losses:
        heads = copy.deepcopy(start)
        result, curve = fit_one(cfg, model, heads, data, loss, args.steps, args.eval_every)
        acc = result["acceptance_after"]
        K = len(acc)
        batch = Engine(model, heads.eval(), max_batch=128).generate(prompts, sp, SpecParams(mode="fixed", k=K),
                                                                    seed=1)
        if loss == "tv" and args.save_tv:
            heads.save(args.save_tv, policy_version=0, extra={"fit": f"{args.warm_start} KL + {args.steps} TV steps"})
            print(f"saved the tv heads to {args.save_tv}", flush=True)
        rows.append({"loss": loss, "acceptance": acc, "predicted_len": expected_tokens(acc, K),
                     "engine_len": batch.stats.mean_accepted_len, "fit_time_s": result["time_s"]})
        curves[loss] = warm + [(args.warm_start + s, a) for s, a in curve]
        print(f"{loss}: acceptance {' '.join(f'{a:.3f}' for a in acc)}; predicted length "
              f"{rows[-1]['predicted_len']:.2f}, engine {rows[-1]['engine_len']:.2f}", flush=True)
        report(rows, curves, args)


if __name__ == "__main__":
    main()
