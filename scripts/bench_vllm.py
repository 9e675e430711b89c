"""vLLM (rollout.backend=vllm) against specroll's engine on SmolLM2-135M-Instruct: one table.

Run with the vLLM venv's python (scripts/test_vllm.sh builds it); specroll's engine runs in a
subprocess under --specroll-python, so vLLM's thread binding in this process does not touch it.
Per round, fresh prompts and seeds, every configuration at every batch size, in turns; the table
gives medians of tokens/s and of the per-round paired ratios with their range. All rows emit
exactly max_new_tokens per prompt (no stop tokens), so tokens/s compare like for like.

Configurations: plain decoding at temperature 1 (vLLM and specroll), and, where vLLM's speculative
sampling is exact (temperature 0; at temperature 1 it fails the goodness-of-fit check), vLLM with
specroll's parallel heads exported as a Medusa draft against vLLM plain at temperature 0.

  scripts/test_vllm.sh --bench    # or: .venv-vllm/bin/python scripts/bench_vllm.py --heads DIR
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


def serve_specroll(model_dir: str, max_batch: int, threads: int) -> None:
    """Child process: one JSON request per stdin line -> one JSON line of tokens and seconds."""
    import torch

    from rollout.checkpoint import load_checkpoint
    from rollout.engine import Engine
    from rollout.types import SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(load_checkpoint(model_dir), None, max_batch=max_batch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sp = SamplingParams(temperature=req["temperature"], max_new_tokens=req["max_new_tokens"])
        batch = engine.generate(req["prompts"], sp, None, seed=req["seed"])
        print(json.dumps({"tokens": batch.stats.tokens, "time_s": batch.stats.time_s}), flush=True)


class SpecrollChild:
    def __init__(self, python: str, model_dir: str, max_batch: int, threads: int):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([python, __file__, "--serve-specroll", "--model", model_dir,
                                      "--max-batch", str(max_batch), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, prompts, temperature, max_new_tokens, seed) -> float:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "temperature": temperature, "seed": seed,
                                          "max_new_tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["tokens"] / out["time_s"]

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
    ap.add_argument("--serve-specroll", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_specroll:
        return serve_specroll(args.model, args.max_batch, args.threads)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # vLLM otherwise serves on one thread
    from rollout.checkpoint import resolve_model

    model_dir = args.model or resolve_model("smollm2-135m")
    batches = [int(b) for b in args.batches.split(",")]
    from rollout.checkpoint import load_checkpoint
    from rollout.types import RolloutConfig, SpecParams
    from rollout.vllm_worker import VllmRolloutWorker
    from spec_heads.heads import DraftHeads

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
    child = SpecrollChild(args.specroll_python, model_dir, max(batches), args.threads)
    rows: dict[tuple, list[float]] = {}
    accepted: dict[int, list[float]] = {}
    # warm-up: every engine once at the largest batch (vLLM builds lazily; first calls allocate)
    warm = _prompts(model_dir, max(batches), seed=10_000)
    _vllm_run(plain, warm, 1.0, 8, 0)
    child.run(warm, 1.0, 8, 0)
    if spec_worker:
        _vllm_run(spec_worker, warm, 0.0, 8, 0, spec)
    for r in range(args.rounds):
        for b in batches:
            prompts = _prompts(model_dir, b, seed=1000 * r + b)
            seed = 7 * r + b
            rows.setdefault(("vllm", 1.0, b), []).append(_vllm_run(plain, prompts, 1.0, args.max_new_tokens, seed)[0])
            rows.setdefault(("specroll", 1.0, b), []).append(child.run(prompts, 1.0, args.max_new_tokens, seed))
            if spec_worker:
                rows.setdefault(("vllm", 0.0, b), []).append(_vllm_run(plain, prompts, 0.0, args.max_new_tokens, seed)[0])
                tps, acc = _vllm_run(spec_worker, prompts, 0.0, args.max_new_tokens, seed, spec)
                rows.setdefault(("vllm+heads", 0.0, b), []).append(tps)
                accepted.setdefault(b, []).append(acc)
            print(f"round {r + 1}/{args.rounds} batch {b} done", file=sys.stderr, flush=True)
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
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def _table(rows, accepted, batches, args) -> None:
    print(f"\nSmolLM2-135M-Instruct fp32, {args.max_new_tokens} new tokens per prompt, {args.rounds} rounds, "
          f"{args.threads} threads; tokens/s medians, ratios: median of per-round ratios [range]")
    print(f"{'batch':>5} | {'vllm T=1':>9} | {'specroll T=1':>12} | {'vllm/specroll':>19}"
          + (f" | {'vllm T=0':>9} | {'vllm+heads T=0':>14} | {'heads/plain':>19} | {'accepted len':>12}"
             if accepted else ""))
    for b in batches:
        med = lambda key: statistics.median(rows[key])  # noqa: E731
        line = (f"{b:>5} | {med(('vllm', 1.0, b)):>9.1f} | {med(('specroll', 1.0, b)):>12.1f} | "
                f"{_ratio(rows, ('vllm', 1.0, b), ('specroll', 1.0, b)):>19}")
        if accepted:
            line += (f" | {med(('vllm', 0.0, b)):>9.1f} | {med(('vllm+heads', 0.0, b)):>14.1f} | "
                     f"{_ratio(rows, ('vllm+heads', 0.0, b), ('vllm', 0.0, b)):>19} | "
                     f"{statistics.median(accepted[b]):>12.2f}")
        print(line)


if __name__ == "__main__":
    main()
