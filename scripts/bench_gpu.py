"""Plain decoding on a GPU against the memory roofline and `transformers` `generate`, and what
verifying several tokens per row costs against one. Random weights (speed does not depend on
them); prints tables and writes every row as JSON.

Plain decode: the engine (CUDA graphs, rollout.cuda_graphs) generates `--new` tokens per row
for `--batch` rows of `--prompt`-token prompts with no stop token, timed end to end (prefill
included) after a warm-up call that captures its graphs; `generate` runs the same work with its
default cache and with `cache_implementation="static"` (compiled by transformers itself; it
compiles per batch size, so `--hf-static` picks the shapes and batch sizes that pay for that).
The bound is the step's bytes (every weight once, each row's KV cache at its mean length) over
the card's measured copy bandwidth (bytes read plus written by a large device-to-device copy).

Verify cost: one forward (with the LM head) of W = 2 / 4 / 8 tokens per row over one of 1
token, each captured in a CUDA graph and timed by replays, at each batch size.

    python scripts/bench_gpu.py --shapes qwen2.5-0.5b qwen2.5-7b --batch 1 8 64 --hf default \\
        --hf-static qwen2.5-0.5b:64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout.cuda_graphs import GraphConfig  # noqa: E402
from rollout.engine import Engine, _attention_backends  # noqa: E402
from rollout.model import ModelConfig, Transformer  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402
from spec_heads.fused import fused_elementwise  # noqa: E402
from bench_gpu_spec import print_spec_table, run_spec  # noqa: E402

# Hugging Face config fields of the published models (weights random here)
SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, rope_theta=1000000.0),
}


def sync():
    torch.cuda.synchronize()


def copy_bandwidth(gib: float = 1.0, reps: int = 20) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        sync()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times)


def build(shape: str, dtype: torch.dtype):
    cfg = ModelConfig.from_hf({**SHAPES[shape], "max_position_embeddings": 32768})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def step_bytes(model: Transformer, batch: int, ctx: float) -> float:
    """Bytes a decode step must read: every weight once (the embedding only where it is the LM
    head too: a lookup reads `batch` rows of it) and each row's KV cache at length ctx."""
    c = model.config
    w = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
            if c.tie_word_embeddings or not n.startswith("embed_tokens"))
    elem = next(model.parameters()).element_size()
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * elem * ctx * batch
    return w + kv


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


VARIANTS = {"fused": GraphConfig(), "graphs": GraphConfig(fuse=False), "eager": GraphConfig(enabled=False, fuse=False)}


def time_engine(model, batch: int, prompt: int, new: int, repeats: int, variant: str = "fused") -> tuple[float, dict]:
    eng = Engine(model, max_batch=batch, graphs=VARIANTS[variant])
    prompts = prompts_for(batch, prompt, model.config.vocab_size)
    sp = SamplingParams(temperature=1.0, max_new_tokens=new, stop_token_ids=[])
    eng.generate(prompts, sp)  # warm-up: captures the graphs of every attention span
    times = []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = eng.generate(prompts, sp, seed=r)
        sync()
        times.append(time.perf_counter() - t0)
        assert out.stats.tokens == batch * new
    g = eng.graphs
    return statistics.median(times), {"graphs": len(g), "replays": g.replays}


def hf_model(model: Transformer):
    import transformers

    cfg = transformers.AutoConfig.for_model(**{**model.config.to_hf(), "eos_token_id": None,
                                               "bos_token_id": None, "pad_token_id": 0})
    dtype = next(model.parameters()).dtype
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return hf.eval()


def time_hf(hf, batch: int, prompt: int, new: int, repeats: int, cache: str | None) -> float:
    ids = torch.tensor(prompts_for(batch, prompt, hf.config.vocab_size), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    if cache:
        kw["cache_implementation"] = cache
    with torch.inference_mode():
        hf.generate(ids, **kw)  # warm-up (and, with a static cache, transformers' compile)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == prompt + new
    return statistics.median(times)


@torch.inference_mode()
def verify_cost(model, batch: int, widths, ctx: int, replays: int = 30) -> dict[int, float]:
    """Seconds of one forward + LM head of W tokens per row at positions ctx.., per width, with
    the engine's kernels (fused elementwise chains, grouped-query attention), each captured as a CUDA graph and timed by replays (median of replays)."""
    kv = -(-(ctx + max(widths)) // 64) * 64
    cache = model.new_cache(batch, kv)
    out = {}
    with _attention_backends(torch.device("cuda")), fused_elementwise():  # the engine's kernels
        for w in widths:
            ids = torch.randint(3, model.config.vocab_size, (batch, w), device="cuda")
            pos = (ctx + torch.arange(w, device="cuda")).expand(batch, w)
            fwd = lambda: model.logits(model(ids, pos, cache, kv))  # noqa: E731
            fwd()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fwd()
            times = []
            for _ in range(replays):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                sync()
                times.append(a.elapsed_time(b) / 1e3)
            out[w] = statistics.median(times)
            del g
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--hf", nargs="*", default=["default"], choices=["default", "static"],
                    help="transformers generate at every batch size, with these caches")
    ap.add_argument("--hf-max-batch", type=int, default=64, help="generate only up to this batch size")
    ap.add_argument("--hf-static", nargs="*", default=[], metavar="SHAPE:BATCH",
                    help="static-cache generate at just these (shape, batch) pairs (one compile each)")
    ap.add_argument("--verify", nargs="*", type=int, default=[1, 2, 4, 8], help="verify widths (empty: skip)")
    ap.add_argument("--variants", nargs="+", default=["fused"], choices=list(VARIANTS),
                    help="engine variants: CUDA graphs with fused elementwise kernels, graphs alone, eager")
    ap.add_argument("--spec", action="store_true",
                    help="instead: speculation with controlled acceptance against off (scripts/bench_gpu_spec.py)")
    ap.add_argument("--agree", nargs="+", type=float, default=[0.6, 0.8, 0.9], help="--spec: draft acceptance")
    ap.add_argument("--depths", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6], help="--spec: fixed depths")
    ap.add_argument("--rounds", type=int, default=3, help="--spec: paired rounds")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="--spec: the heads' draft vocabulary")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name()
    if args.spec:
        rows = []
        for shape in args.shapes:
            rows += run_spec(build(shape, dtype), card, args.batch, args.agree, args.depths, args.prompt, args.new,
                             args.rounds, args.draft_vocab, log=lambda s: print(f"{shape} {s}", flush=True))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"{card}, torch {torch.__version__}, {args.dtype}")
        print_spec_table(rows)
        return
    bw = copy_bandwidth()
    print(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s (read + written), torch {torch.__version__}", flush=True)
    rows = []
    static_pairs = {tuple(p.split(":")) for p in args.hf_static}
    for shape in args.shapes:
        model = build(shape, dtype)
        hf = hf_model(model) if args.hf or static_pairs else None
        for b in args.batch:
            bound = step_bytes(model, b, args.prompt + args.new / 2) / bw
            row = {"card": card, "shape": shape, "batch": b, "dtype": args.dtype, "prompt": args.prompt,
                   "new": args.new, "bound_ms_step": 1e3 * bound, "bound_tok_s": b / bound, "copy_bw": bw}
            for v in args.variants:
                t, info = time_engine(model, b, args.prompt, args.new, args.repeats, v)
                row[v] = {"s": t, "tok_s": b * args.new / t, "ms_step": 1e3 * t / args.new, **info}
            t = row[args.variants[0]]["s"]
            row.update(engine_s=t, engine_tok_s=b * args.new / t, engine_ms_step=1e3 * t / args.new)
            row["fraction_of_bound"] = row["bound_ms_step"] / row["engine_ms_step"]
            caches = [c for c in args.hf if b <= args.hf_max_batch and c == "default"]
            if "static" in args.hf and b <= args.hf_max_batch or (shape, str(b)) in static_pairs:
                caches.append("static")
            for c in caches:
                try:
                    th = time_hf(hf, b, args.prompt, args.new, args.repeats, None if c == "default" else c)
                    row[f"hf_{c}_tok_s"] = b * args.new / th
                    row[f"vs_hf_{c}"] = th / t
                except Exception as err:  # a peer that fails is reported, not fatal
                    row[f"hf_{c}_error"] = f"{type(err).__name__}: {err}"[:300]
            if args.verify:
                vc = verify_cost(model, b, args.verify, args.prompt + args.new // 2)
                row["verify_ms"] = {w: 1e3 * s for w, s in vc.items()}
                row["verify_ratio"] = {w: s / vc[args.verify[0]] for w, s in vc.items()}
            rows.append(row)
            print_row(row, args.verify)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
        del model, hf
        torch.cuda.empty_cache()
    print_table(rows, args.verify)


def print_row(r, widths):
    hf = " ".join(f"{k}={v:.1f}" for k, v in r.items() if k.startswith("hf_") and k.endswith("tok_s"))
    vr = " ".join(f"{w}:{x:.2f}" for w, x in r.get("verify_ratio", {}).items())
    vs = " ".join(f"{v}={r[v]['tok_s']:.0f}" for v in VARIANTS if v in r)
    print(f"{r['shape']} b{r['batch']}: {r['engine_tok_s']:.0f} tok/s, {r['engine_ms_step']:.3f} ms/step, "
          f"bound {r['bound_ms_step']:.3f} ms ({100 * r['fraction_of_bound']:.0f}%), {vs} {hf} verify {vr}", flush=True)


def print_table(rows, widths):
    print(f"\n| shape | batch | engine tok/s | ms/step | bound ms/step | % of bound | HF default tok/s | x HF default "
          f"| HF static tok/s | x HF static | " + " | ".join(f"verify {w} / 1" for w in widths[1:]) + " |")
    print("|---" * (10 + len(widths[1:])) + "|")
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else ("err" if k.replace("tok_s", "error") in r else "-")
    for r in rows:
        ver = " | ".join(f"{r['verify_ratio'][w]:.2f}" for w in widths[1:]) if "verify_ratio" in r else ""
        print(f"| {r['shape']} | {r['batch']} | {r['engine_tok_s']:.0f} | {r['engine_ms_step']:.3f} | "
              f"{r['bound_ms_step']:.3f} | {100 * r['fraction_of_bound']:.0f}% | {f(r, 'hf_default_tok_s', '.0f')} | "
              f"{f(r, 'vs_hf_default', '.2f')} | {f(r, 'hf_static_tok_s', '.0f')} | {f(r, 'vs_hf_static', '.2f')} | "
              f"{ver} |")


if __name__ == "__main__":
    main()
