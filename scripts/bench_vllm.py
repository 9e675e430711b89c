"""vLLM (rollout.backend=vllm) against specroll's engine on SmolLM2-135M-Instruct: one table.

Run with the vLLM venv's python (scripts/test_vllm.sh builds it); specroll's engine runs in a
subprocess under --specroll-python, so vLLM's thread binding in this process does not touch it.
Per round, fresh prompts and seeds, every configuration at every batch size, in turns; the table
gives medians of tokens/s and of the per-round paired ratios with their range. All rows emit
exactly max_new_tokens per prompt (no stop tokens), so tokens/s compare like for like.

Configurations: plain decoding at temperature 1 (vLLM and specroll); specroll's engine with its
sequential heads at temperature 1 (--spec-heads; exact there); and, where vLLM's speculative
sampling is exact (temperature 0; at temperature 1 it fails the goodness-of-fit check), vLLM with
specroll's parallel heads exported as a Medusa draft against vLLM plain at temperature 0 (--heads).

  .venv-vllm/bin/python scripts/bench_vllm.py --spec-heads SEQ_DIR --heads PAR_DIR \
      --specroll-python .venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prompts(model_dir: str, n: int, seed: int) -> list[list[int]]:
    from experiments.tasks import TaskConfig, make_task
    from experiments.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(model_dir)
    task = make_task(TaskConfig(name="gsm8k", path=str(ROOT / "data" / "arith_gsm8k.jsonl")), chat=tok.apply_chat)
    return [tok.encode(ex.prompt) for ex in task.train_prompts(n, seed=seed)]


def serve_specroll(model_dir: str, heads_dir: str, max_batch: int, threads: int) -> None:
    """Child process: one JSON request per stdin line -> one JSON line of tokens, seconds and
    accepted length. A request's "spec" (entropy / fixed:K / off) needs --spec-heads."""
    import torch

    from rollout.checkpoint import load_checkpoint
    from rollout.engine import Engine
    from rollout.types import SamplingParams, SpecParams
    from spec_heads.heads import DraftHeads

    torch.set_num_threads(threads)
    model = load_checkpoint(model_dir)
    heads = DraftHeads.load(heads_dir, model.config)[0] if heads_dir else None
    engine = Engine(model, heads, max_batch=max_batch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sp = SamplingParams(temperature=req["temperature"], max_new_tokens=req["max_new_tokens"])
        mode, _, k = req.get("spec", "off").partition(":")
        spec = None if mode == "off" else SpecParams(mode=mode, k=int(k or 0) or 2)
        batch = engine.generate(req["prompts"], sp, spec, seed=req["seed"])
        print(json.dumps({"tokens": batch.stats.tokens, "time_s": batch.stats.time_s,
                          "accepted_len": batch.stats.mean_accepted_len}), flush=True)


class SpecrollChild:
    def __init__(self, python: str, model_dir: str, heads_dir: str, max_batch: int, threads: int):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([python, __file__, "--serve-specroll", "--model", model_dir,
                                      "--spec-heads", heads_dir, "--max-batch", str(max_batch),
                                      "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, prompts, temperature, max_new_tokens, seed, spec="off") -> tuple[float, float]:
        """(tokens/s, mean accepted length) of one engine call."""
        self.proc.stdin.write(json.dumps({"prompts": prompts, "temperature": temperature, "seed": seed,
                                          "max_new_tokens": max_new_tokens, "spec": spec}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["tokens"] / out["time_s"], out["accepted_len"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _vllm_run(worker, prompts, temperature, max_new_tokens, seed, spec=None) -> tuple[float, float]:
    from rollout.types import SamplingParams

    t = time.perf_counter()
    batch = worker.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens),
                            spec, seed=seed)
    tokens = sum(len(s.tokens) for s in batch.sequences)
    return tokens / (time.perf_counter() - t), worker.throughput()["mean_accepted_len"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF folder (default: the converted smollm2-135m)")
    ap.add_argument("--heads", default="", help="parallel heads: a DraftHeads.save folder, or 'fresh' "
                    "(unfitted); '' skips the speculative rows")
    ap.add_argument("--exactness", type=int, default=0, help="draws for the exactness table (0: skip it)")
    ap.add_argument("--engines", default="plain,heads,ngram", help="exactness table rows (vLLM 0.32 on a CPU "
                    "may fail to build a third engine in one process: run them one per call)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=3, help="drafts per step for vLLM's Medusa proposer")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--specroll-python", default=sys.executable, help="python for the specroll side (no vLLM needed)")
    ap.add_argument("--spec-heads", default="", help="sequential heads for specroll's engine (specroll fit-heads "
                    "folder); '' skips the specroll+heads rows")
    ap.add_argument("--spec", default="entropy", help="specroll's drafting with --spec-heads: entropy or fixed:K")
    ap.add_argument("--serve-specroll", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_specroll:
        return serve_specroll(args.model, args.spec_heads, args.max_batch, args.threads)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # vLLM otherwise serves on one thread
    from rollout.checkpoint import resolve_model

    model_dir = args.model or resolve_model("smollm2-135m")
    batches = [int(b) for b in args.batches.split(",")]
    from rollout.checkpoint import load_checkpoint
    from rollout.types import RolloutConfig, SpecParams
    from rollout.vllm_worker import VllmRolloutWorker
    rollout = RolloutConfig(backend="vllm", max_batch=max(batches), max_seq_len=512)
    plain = VllmRolloutWorker(model_dir, None, rollout)
    spec_worker, spec = None, None
    if args.exactness:
        exactness_table(model_dir, rollout, args)
    if args.rounds == 0:
        return
    if args.heads:
        policy = load_checkpoint(model_dir)
        heads = _heads(args.heads, args.k, policy.config)
        spec_worker = VllmRolloutWorker(policy.config, heads.config, rollout,
                                        policy_state=dict(policy.state_dict()), heads_state=heads.state_dict())
        spec = SpecParams(mode="fixed", k=args.k, draft="greedy")
        del policy
    child = SpecrollChild(args.specroll_python, model_dir, args.spec_heads, max(batches), args.threads)
    rows: dict[tuple, list[float]] = {}  # (engine, batch) -> tokens/s per round
    accepted: dict[tuple, list[float]] = {}  # (engine, batch) -> mean accepted length per round
    # warm-up at every batch size (vLLM builds lazily, first calls allocate, entropy mode
    # measures its step costs per batch size)
    for b in batches:
        warm = _prompts(model_dir, b, seed=10_000 + b)
        _vllm_run(plain, warm, 1.0, 8, 0)
        child.run(warm, 1.0, 8, 0)
        if args.spec_heads:
            child.run(warm, 1.0, 16, 0, args.spec)
        if spec_worker:
            _vllm_run(spec_worker, warm, 0.0, 8, 0, spec)

    def add(name, b, tps, acc=None):
        rows.setdefault((name, b), []).append(tps)
        if acc is not None:
            accepted.setdefault((name, b), []).append(acc)

    for r in range(args.rounds):
        for b in batches:
            prompts = _prompts(model_dir, b, seed=1000 * r + b)
            seed = 7 * r + b
            add("vllm T=1", b, _vllm_run(plain, prompts, 1.0, args.max_new_tokens, seed)[0])
            add("specroll T=1", b, child.run(prompts, 1.0, args.max_new_tokens, seed)[0])
            if args.spec_heads:
                add("specroll+heads T=1", b, *child.run(prompts, 1.0, args.max_new_tokens, seed, args.spec))
            if spec_worker:
                add("vllm T=0", b, _vllm_run(plain, prompts, 0.0, args.max_new_tokens, seed)[0])
                add("vllm+heads T=0", b, *_vllm_run(spec_worker, prompts, 0.0, args.max_new_tokens, seed, spec))
            done = {name: round(v[-1], 1) for (name, bb), v in rows.items() if bb == b}
            print(f"round {r + 1}/{args.rounds} batch {b}: tokens/s {done}", file=sys.stderr, flush=True)
    child.close()
    _table(rows, accepted, batches, args)


def _heads(where: str, k: int, model_config):
    """Fitted parallel heads from a folder, or 'fresh' ones (each depth drafts the trunk's own
    next-token guess: the blocks start as the identity), which need no fit."""
    from spec_heads.heads import DraftHeads, HeadConfig

    if where == "fresh":
        return DraftHeads(HeadConfig("parallel", k), model_config)
    heads, _ = DraftHeads.load(where, model_config)
    return heads


def exactness_table(model_dir: str, rollout, args) -> None:
    """specroll's start-up check on vLLM's output: plain sampling, prompt-lookup (ngram) drafts and
    the Medusa export of specroll's parallel heads, at temperature 1; plus a seeded request."""
    import dataclasses

    from rollout.checkpoint import load_checkpoint
    from rollout.types import SamplingParams, VllmParams
    from rollout.vllm_worker import VllmRolloutWorker

    policy = load_checkpoint(model_dir)
    heads = _heads(args.heads or "fresh", args.k, policy.config)
    cfg = dataclasses.replace(rollout, max_batch=256, vllm=VllmParams(check_draws=args.exactness))
    w = VllmRolloutWorker(policy.config, heads.config, cfg, policy_state=dict(policy.state_dict()),
                          heads_state=heads.state_dict())
    del policy
    sp = SamplingParams(temperature=1.0, max_new_tokens=4)
    print(f"\nexactness: {args.exactness} completions of one prompt, tokens 2-3 against the policy at "
          f"temperature 1 (chi-square; fails below p=1e-3)")
    print(f"{'engine':>22} | {'p-value':>9} | {'dof':>5} | {'zero-mass draws':>15} | seeded request")
    engines = {"plain": ("plain", 0, "medusa"), "ngram": (f"ngram k={args.k}", args.k, "ngram"),
               "heads": (f"specroll heads k={args.k}", args.k, "medusa")}
    for name in args.engines.split(","):
        label, k, method = engines[name]
        w.start_engine(k, k > 0, method)
        fit = w.check_speculation(sp)
        w._checked.add((sp.temperature, sp.top_k, sp.top_p))  # the probe below is about seeds, not the check
        try:
            w.generate([[1, 2, 3]], sp, None, seed=5)  # one seeded request through this engine
            seeded = "ok"
        except Exception as e:  # what vLLM raises is the evidence
            seeded = f"{type(e).__name__}: {str(e)[:60]}"
        print(f"{label:>22} | {fit.pvalue:>9.2e} | {fit.dof:>5} | {fit.zero_mass_hits:>15} | {seeded}", flush=True)
        w.close()


def _ratio(rows, a, b):
    ratios = [x / y for x, y in zip(rows[a], rows[b])]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _table(rows, accepted, batches, args) -> None:
    """Markdown: tokens/s medians per engine, then medians (ranges) of per-round paired ratios."""
    engines = list(dict.fromkeys(name for name, _ in rows))
    pairs = [(a, b) for a, b in (("vllm T=1", "specroll T=1"), ("specroll+heads T=1", "specroll T=1"),
                                 ("specroll+heads T=1", "vllm T=1"), ("vllm+heads T=0", "vllm T=0"))
             if a in engines and b in engines]
    print(f"\nSmolLM2-135M-Instruct fp32, {args.max_new_tokens} new tokens per prompt, {args.rounds} rounds, "
          f"{args.threads} threads; tokens/s medians; ratios: median of per-round ratios (range); "
          f"specroll+heads: spec {args.spec}; vllm+heads: Medusa k={args.k}, greedy drafts\n")
    head = ["batch"] + [f"{e} tok/s" for e in engines] + [f"{a} / {b}" for a, b in pairs]
    head += [f"{e} accepted len" for e in engines if any((e, b) in accepted for b in batches)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for b in batches:
        cells = [str(b)] + [f"{statistics.median(rows[(e, b)]):.1f}" for e in engines]
        cells += [_ratio(rows, (a, b), (c, b)) for a, c in pairs]
        cells += [f"{statistics.median(accepted[(e, b)]):.2f}" for e in engines if (e, b) in accepted]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"rows": {f"{e}|{b}": v for (e, b), v in rows.items()},
                      "accepted": {f"{e}|{b}": v for (e, b), v in accepted.items()}}))


if __name__ == "__main__":
    main()
