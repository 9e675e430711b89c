"""`specroll bench`: rollout throughput, speculative against plain sampling, as a printed table.

For each batch size, on one prompt set: the engine with speculation off, each requested
speculative mode, and transformers' `generate` on the same model (the peer). Every speedup is a
ratio measured in this run on this machine: against the same engine with speculation off, and
against the peer. Each configuration gets one warm-up run, then rounds that run every
configuration of a batch size once, in turn (`--repeats`; by default as many as fit in about two
minutes, 3 to 15). A speedup is the median over rounds of that round's ratio (paired: a load
spike or a slow spell of a shared machine hits both sides of a ratio alike), reported with the
range of the per-round ratios; tokens/s is the median run. CPU timings are only ratios; a GPU
run names the card.

Next to the measured speedup the table shows the one predicted from the run's measured
per-position acceptance and the measured cost of its decode steps against the off run's, both
from the same round (`predict`), and the fraction of it achieved: a low fraction points at time
outside the decode steps (prefill, where the heads also run over each prompt), at tokens drafted
past a stop token, or at acceptance that is not independent across positions, not at the heads.
The JSON also holds the prediction from the engine's online cost model
(`predicted_speedup_cost_model`), which shows how well the entropy policy knows its step costs.

This is a script that prints a table, never a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from experiments.config import ConfigError, load_config
from experiments.tasks import make_task
from rollout.device import DTYPES, cpu_native_bf16, resolve_device, resolve_dtype
from rollout.types import RolloutStats, SamplingParams, SpecParams
from spec_heads.acceptance import MAX_DEPTH

_OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")
_SPEC_RE = re.compile(r"^(off|entropy|fixed:(\d+)(?:\.\.(\d+))?)$")
MAX_K = MAX_DEPTH  # deepest draft SpecParams accepts


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_spec_list(items: list[str]) -> list[tuple[str, int]]:
    """["off,fixed:1..3", "entropy"] -> [("off", 0), ("fixed", 1), ("fixed", 2), ("fixed", 3),
    ("entropy", 0)]: comma- or space-separated, duplicates dropped, order kept."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        m = _SPEC_RE.match(part)
        if not m:
            raise ValueError(f"--spec {part!r}: not a mode; use off, entropy, fixed:K or fixed:A..B "
                             f"(K in 1..{MAX_K}), e.g. --spec off,fixed:1..4,entropy")
        if m.group(2) is None:
            modes = [(part, 0)]
        else:
            lo = int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            if not 1 <= lo <= hi <= MAX_K:
                raise ValueError(f"--spec {part!r}: draft depths must satisfy 1 <= A <= B <= {MAX_K}; "
                                 f"e.g. fixed:1..4")
            modes = [("fixed", k) for k in range(lo, hi + 1)]
        out += [m_ for m_ in modes if m_ not in out]
    if not out:
        raise ValueError("--spec: no modes given; e.g. --spec off,fixed:1..4,entropy")
    return out


def parse_batches(items: list[str]) -> list[int]:
    """["1,8", "32"] -> [1, 8, 32] (duplicates dropped, order kept)."""
    out: list[int] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--batch {part!r}: batch sizes must be positive integers, e.g. --batch 1,8,32")
        if int(part) not in out:
            out.append(int(part))
    if not out:
        raise ValueError("--batch: no batch sizes given; e.g. --batch 1,8,32,128")
    return out


AUTO_ROUNDS_S, MIN_ROUNDS, MAX_ROUNDS = 120.0, 3, 15


def parse_repeats(items: list[str]) -> str | int:
    """'auto' or a number of timed rounds (checked to be >= 1 with the other flags)."""
    text = items[0]
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--repeats {text}: give a number of rounds, or auto") from None


def auto_rounds(warmup_round_s: float, budget_s: float = AUTO_ROUNDS_S) -> int:
    """Timed rounds that fit in `budget_s` after a warm-up round took `warmup_round_s`, 3..15."""
    if not warmup_round_s > 0:
        return MAX_ROUNDS
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s // warmup_round_s)))


def _argtype(fn):
    def parse(text: str):
        try:
            return fn([text])
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specroll bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="tiny | smollm2-135m | a HF checkpoint folder "
                   "(default: the config's model.name, i.e. tiny)")
    p.add_argument("--heads", default=None, metavar="DIR", help="draft heads folder (default: the heads "
                   "fitted for this model with the config's head settings, fitted now if missing)")
    p.add_argument("--batch", nargs="+", type=_argtype(parse_batches), default=[[1, 8, 32, 128]],
                   help="batch sizes (max rows in flight), e.g. 1,8,32,128 (default)")
    p.add_argument("--spec", nargs="+", type=_argtype(parse_spec_list),
                   default=[parse_spec_list(["off,fixed:1..4,entropy"])],
                   help="modes: off, fixed:K, fixed:A..B, entropy (default off,fixed:1..4,entropy); "
                        "off is always measured, as the baseline")
    p.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="prompts per measurement (default: max(2 * batch, 8))")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: sampling.max_new_tokens")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0: sampled drafts, exact rejection sampling)")
    p.add_argument("--repeats", type=_argtype(parse_repeats), default="auto",
                   help="timed rounds per batch size after one warm-up round, each running every "
                        "configuration once, in turn; speedups are medians of per-round ratios "
                        "(default auto: as many rounds as fit in ~2 minutes, 3 to 15)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' generate on the same model and prompts (default on)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: model.device)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default: model.dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as is)")
    p.add_argument("--seed", type=int, default=None,
                   help="prompt set and sampling seed (default: seed); round r samples with seed + 1 + r, "
                        "every configuration of a round alike")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows to PATH as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the table to PATH as markdown")
    p.add_argument("--config", default="default", metavar="PRESET_OR_PATH",
                   help="run config for the task, heads and sampling (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


# ---------------------------------------------------------------------------------------------
# Model, heads, prompts


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: must be auto, float32, bfloat16 or float16")
    return dev, resolve_dtype(dtype, dev)


def dtype_hint(device: torch.device, dtype: torch.dtype) -> str | None:
    """A line for a float32 run on a CPU that multiplies bf16 natively, where bf16 is faster."""
    if device.type == "cpu" and dtype == torch.float32 and cpu_native_bf16():
        return ("note: this CPU multiplies bf16 natively (AVX512-BF16/AMX); --dtype bfloat16 decodes "
                "faster, and a verify forward over several tokens there costs about one token's "
                "(both modes run in the dtype given, so every ratio stays like for like)")
    return None


def resolve_heads_dir(heads: str | None, cfg, model_dir: str) -> str:
    if heads is not None:
        if not Path(heads).is_dir():
            raise ConfigError(f"--heads {heads}: no such folder; pass a folder written by "
                              "`specroll fit-heads`, or leave --heads out to fit heads for this model")
        return heads
    from experiments.fit_heads import ensure_heads

    return ensure_heads(cfg, model_dir)  # fitted with the config's heads/fit/sampling settings


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS so far (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timed:
    """One configuration's timed runs: tokens/s per run, the engine stats of each, peak memory."""

    rates: list
    stats: list
    peak_mem_mb: float = 0.0

    def speedup_over(self, base: "Timed") -> tuple[float, list[float]]:
        """Median over rounds of this round's rate / the base's rate in the same round, and the
        per-round ratios (paired rounds: drift of a shared machine cancels in each ratio)."""
        ratios = [r / b for r, b in zip(self.rates, base.rates) if b > 0]
        return (statistics.median(ratios) if ratios else math.nan), ratios

    def median(self) -> tuple[float, RolloutStats | None]:
        """Median tokens/s and the stats of that run (engine runs only)."""
        order = sorted(range(len(self.rates)), key=self.rates.__getitem__)
        mid = order[len(order) // 2]
        return self.rates[mid], self.stats[mid] if self.stats else None


class EngineRunner:
    """generate() for one (mode, k) on a shared engine, keeping that mode's depth policy (and so
    its acceptance table and cost model) across runs, even when other modes run in between."""

    def __init__(self, eng, prompts, sampling: SamplingParams, spec: SpecParams, seed: int):
        self.eng, self.prompts, self.sampling, self.spec, self.seed = eng, prompts, sampling, spec, seed
        self.policy = None

    def __call__(self, seed: int | None = None) -> tuple[float, RolloutStats]:
        self.eng.depth_policy = self.policy
        seed = self.seed if seed is None else seed
        stats = self.eng.generate(self.prompts, self.sampling, self.spec, seed=seed).stats
        self.policy = self.eng.depth_policy
        return stats.tokens_per_s, stats  # engine time: the decode loop, prefill included, setup not


class HFRunner:
    """transformers' generate over left-padded batches of `batch` prompts, same sampling and EOS;
    counts each row's tokens up to and including its first EOS, as the engine does."""

    def __init__(self, hf_model, prompts, batch: int, sampling: SamplingParams, eos_id: int,
                 pad_id: int, seed: int, device):
        from transformers import GenerationConfig

        self.model, self.eos_id, self.seed, self.device = hf_model, eos_id, seed, device
        self.batches = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            self.batches.append((ids, mask))
        sample = sampling.temperature > 0
        # every field set here, so nothing comes from the model's generation_config.json
        self.config = GenerationConfig(
            do_sample=sample, temperature=sampling.temperature if sample else None,
            top_k=sampling.top_k if sample else None, top_p=sampling.top_p if sample else None,
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
            eos_token_id=eos_id, pad_token_id=pad_id)

    @torch.inference_mode()
    def __call__(self, seed: int | None = None) -> tuple[float, None]:
        torch.manual_seed(self.seed if seed is None else seed)  # transformers samples from the global generator
        tokens, t0 = 0, time.perf_counter()
        for input_ids, mask in self.batches:
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=self.config)
            gen = out[:, input_ids.shape[1]:]  # [b, T_new]
            is_eos = gen == self.eos_id
            full = torch.full_like(gen[:, 0], gen.shape[1])
            tokens += int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, full).sum())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return tokens / seconds if seconds > 0 else 0.0, None


def time_interleaved(runners: dict, repeats, device, seed: int = 0) -> dict:
    """One warm-up run of each configuration, then `repeats` rounds (or, for "auto", as many as
    fit in AUTO_ROUNDS_S: auto_rounds) that run every configuration once, in turn, in reverse
    order every other round: a load spike or a drift of a shared machine then hits all of them
    alike, not one.

    Each runner is called with a sampling seed: `seed` for the warm-up, seed + 1 + r in round r,
    the same for every configuration of a round. With one seed for every round, each
    configuration would draw the same sample every time, and its luck (exploring steps change
    the random stream of every row they touch, so a mode can emit fewer tokens in as many steps)
    would be a fixed bias of every per-round ratio. Fresh seeds turn that luck into noise that
    the median over rounds averages."""
    timed = {key: Timed([], []) for key in runners}
    t0 = time.perf_counter()
    for run in runners.values():
        run(seed)
    if repeats == "auto":
        repeats = auto_rounds(time.perf_counter() - t0)
    for r in range(repeats):
        # every other round runs the configurations in reverse order: a machine that speeds up
        # or slows down over minutes would otherwise always favour the configurations late in
        # a round; in a reversed pair of rounds a steady drift cancels
        items = list(runners.items())
        for key, run in (items if r % 2 == 0 else items[::-1]):
            _reset_peak(device)
            rate, stats = run(seed + 1 + r)
            t = timed[key]
            t.rates.append(rate)
            if stats is not None:
                t.stats.append(stats)
            t.peak_mem_mb = max(t.peak_mem_mb, peak_mem_mb(device))
    return timed


# ---------------------------------------------------------------------------------------------
# Prediction


def decode_accepted_len(stats: RolloutStats) -> float:
    """Tokens per verify row-step. Each sequence's first token comes from prefill, not a verify
    step, so it is left out: exactly 1.0 with speculation off."""
    return stats.mean_accepted_len


def mean_rows(stats: RolloutStats, batch: int) -> int:
    """Rows in flight per decode step, on average (the batch drains at the end of a run)."""
    return max(1, min(batch, round(stats.row_steps / stats.steps))) if stats.steps else 1


def decode_time(stats: RolloutStats) -> float:
    """Seconds a run spent in decode steps (its time less prefill)."""
    return stats.time_s - stats.prefill_time_s


def decode_step_time(stats: RolloutStats) -> float:
    """Seconds per decode step of a run (prefill left out)."""
    return decode_time(stats) / stats.steps if stats.steps else math.nan


def expected_decode_tokens(stats: RolloutStats) -> float:
    """Tokens the run's decode steps yield by its measured per-position acceptance: a row-step
    verifying d drafts yields 1 + a_1 + a_1 a_2 + ... (depth_hist counts row-steps by d); one
    token per row-step without speculation."""
    from spec_heads.acceptance import expected_tokens

    if not stats.depth_hist:
        return float(stats.row_steps)
    accept = stats.accept_rate_per_pos
    return sum(count * expected_tokens(accept, depth) for depth, count in enumerate(stats.depth_hist))


def predict(stats: RolloutStats, off_stats: RolloutStats) -> float:
    """Speedup over off predicted from measured acceptance and measured step costs, both runs
    of the same round: the tokens the run's decode steps yield by its per-position acceptance
    (expected_decode_tokens) per second of those steps (draft + verify, and its plain steps in
    entropy mode), over the off run's tokens per second of decode steps. What it leaves out is
    what `achieved` (measured / predicted) shows: prefill (the heads also run over each prompt),
    tokens drafted past a stop token, and acceptance that is not independent across positions.

    Both timings come from the same round, minutes apart at most: on a shared machine whose
    speed drifts by tens of percent, a prediction built from timings of other minutes (such as
    the engine's online cost model, `predict_from_cost_model`) moves by about as much."""
    spec_rate = expected_decode_tokens(stats) / decode_time(stats)
    off_rate = off_stats.row_steps / decode_time(off_stats)
    return spec_rate / off_rate if off_rate > 0 and math.isfinite(spec_rate) else math.nan


def predict_from_cost_model(stats: RolloutStats, cost, plain_step_s: float, rows: int) -> float:
    """The same prediction from the engine's online step-cost model (what the entropy policy
    decides with): a drafting step's time is cost.step_time at `rows` in flight, a plain step's
    is `plain_step_s` (the off run's). Shows how well the policy's model knows the step costs."""
    from spec_heads.acceptance import expected_tokens

    accept = stats.accept_rate_per_pos
    tokens = time_ = 0.0
    for depth, count in enumerate(stats.depth_hist):
        tokens += count * expected_tokens(accept, depth)
        time_ += count * (cost.step_time(rows, 1 + depth) if depth else plain_step_s)
    return tokens / time_ * plain_step_s if time_ > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# One batch size


def bench_batch(model, heads, hf_model, prompts, batch: int, modes, sampling: SamplingParams,
                spec_base: SpecParams, tok, seed: int, repeats: int, device, label: dict) -> list[dict]:
    """Rows for one batch size: the engine per mode and the peer, interleaved. Predictions pair
    each round's runs (`predict`); the cost-model prediction uses the entropy run's cost model
    (start-up probes + real steps), or a probed one without entropy."""
    from rollout.engine import Engine

    eng = Engine(model, heads, max_batch=batch, device=device)
    K = heads.config.num_depths
    runners = {}
    for mode, k in modes:
        # k is only read in fixed mode, but DepthPolicy checks k <= max_k in every mode
        spec = replace(spec_base, mode=mode, k=k if mode == "fixed" else 1, max_k=K)
        runners[(mode, k)] = EngineRunner(eng, prompts, sampling, spec, seed)
    if hf_model is not None:
        runners[("hf", 0)] = HFRunner(hf_model, prompts, batch, sampling, tok.eos_id, tok.pad_id, seed, device)
    timed = time_interleaved(runners, repeats, device, seed)
    # one cost model for every cost-model prediction, so they compare like with like: a fixed run's own
    # timings are real steps (bookkeeping included), which the start-up probes are not
    if ("entropy", 0) in runners:
        cost = runners[("entropy", 0)].policy.cost
    else:  # the engine times (rows x tokens) steps to seed an entropy policy's cost model
        eng.depth_policy = None
        cost = eng.ensure_depth_policy(replace(spec_base, mode="entropy", k=1, max_k=K), K).cost
    off_timed = timed[("off", 0)]
    off, off_stats = off_timed.median()
    # the cost-model prediction takes every mode's step costs at the rows in flight of the off
    # run, where its plain step was timed (speculative runs drain sooner)
    plain_step_s, off_rows = decode_step_time(off_stats), mean_rows(off_stats, batch)
    hf_timed = timed.get(("hf", 0))
    hf = hf_timed.median()[0] if hf_timed is not None else None
    rows = []
    for (mode, k), t in timed.items():
        rate, stats = t.median()
        speedup, rounds = t.speedup_over(off_timed)
        row = {**label, "batch": batch, "mode": mode, "k": k, "tokens_per_s": rate,
               "speedup_vs_off": speedup, "speedup_vs_off_rounds": rounds, "rounds": len(t.rates),
               "hf_tokens_per_s": hf, "speedup_vs_hf": t.speedup_over(hf_timed)[0] if hf_timed else None,
               "peak_mem_mb": t.peak_mem_mb}
        if stats is None:  # the peer
            row.update(mean_accepted_len=1.0, accept_rate_per_pos=[], depth_hist=[], predicted_speedup=None,
                       fraction_of_predicted=None, mean_rows=None, tokens=None, time_s=None)
        else:
            # paired like the speedup: each round's prediction from that round's two runs, and
            # achieved = the median of each round's measured / predicted
            preds = [predict(s, o) for s, o in zip(t.stats, off_timed.stats)] if mode != "off" else [1.0]
            pred = statistics.median(preds)
            achieved = [r / p for r, p in zip(rounds, preds) if p > 0] if mode != "off" else [1.0]
            row.update(mean_accepted_len=decode_accepted_len(stats), accept_rate_per_pos=stats.accept_rate_per_pos,
                       depth_hist=stats.depth_hist, predicted_speedup=pred,
                       fraction_of_predicted=statistics.median(achieved) if achieved else None,
                       predicted_speedup_cost_model=(predict_from_cost_model(stats, cost, plain_step_s, off_rows)
                                                     if mode != "off" else 1.0),
                       mean_rows=mean_rows(stats, batch), tokens=stats.tokens, time_s=stats.time_s,
                       prefill_time_s=stats.prefill_time_s, draft_time_s=stats.draft_time_s,
                       verify_time_s=stats.verify_time_s)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


COLUMNS = ("model", "device", "batch", "mode", "k", "tok/s", "x off", "x off range", "x HF", "acc len",
           "accept/pos", "pred x", "achieved", "peak MB")


def _range(ratios) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios and len(ratios) > 1 else "-"


def table_cells(r: dict) -> list[str]:
    """One result row as the table's cells (shared by the terminal and markdown tables)."""
    return [r["model"], r["device"], str(r["batch"]), "hf generate" if r["mode"] == "hf" else r["mode"],
            str(r["k"]) if r["mode"] == "fixed" else "-", _fmt(r["tokens_per_s"], ".1f"),
            _fmt(r["speedup_vs_off"]),
            _range(r.get("speedup_vs_off_rounds")) if r["mode"] != "off" else "-",
            _fmt(r["speedup_vs_hf"]), _fmt(r["mean_accepted_len"]),
            " ".join(f"{a:.2f}" for a in r["accept_rate_per_pos"]) or "-",
            _fmt(r["predicted_speedup"]), _fmt(r["fraction_of_predicted"], ".0%"), _fmt(r["peak_mem_mb"], ".0f")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    table = Table(title=title, caption=caption)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("model", "device", "mode", "accept/pos") else "right")
    last_batch = None
    for r in rows:
        if last_batch is not None and r["batch"] != last_batch:
            table.add_section()
        last_batch = r["batch"]
        table.add_row(*table_cells(r))
    console.print(table)


def write_json(rows: list[dict], path: str) -> None:
    """All rows, written to a temp file next to `path`, then renamed (never half-written)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_args(args) -> None:
    repeats = None if args.repeats == "auto" else args.repeats
    for flag, value in (("--prompts", args.prompts), ("--repeats", repeats), ("--threads", args.threads),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")


def _load(args, cfg):
    """-> (model, heads, tokenizer, model_dir, heads_dir, device, dtype), every user error a ConfigError."""
    from experiments.fit_heads import policy_dir
    from experiments.tokenizer import TextTokenizer
    from rollout.checkpoint import load_checkpoint
    from spec_heads.heads import DraftHeads

    device, dtype = resolve_device_dtype(cfg.model.device, cfg.model.dtype)
    model_dir = policy_dir(cfg)  # tiny (built if missing), a named model (converted once) or a folder
    heads_dir = resolve_heads_dir(args.heads, cfg, model_dir)
    model = load_checkpoint(model_dir, device=device, dtype=dtype)
    try:
        heads, _ = DraftHeads.load(heads_dir, model.config, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--heads {heads_dir}: {e}") from None
    return model, heads, TextTokenizer.from_dir(model_dir), model_dir, heads_dir, device, dtype


def parse_args(argv: list[str] | None):
    """Flags plus key.sub=value overrides anywhere on the line (a `--batch 1 8` list would
    otherwise swallow an override that follows it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if _OVERRIDE_RE.match(a)]
    args = build_parser().parse_args([a for a in argv if not _OVERRIDE_RE.match(a)])
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check_args(args)
    batches = list(dict.fromkeys(b for group in args.batch for b in group))
    # off is always measured: every speedup is a ratio to it
    modes = list(dict.fromkeys([("off", 0)] + [m for group in args.spec for m in group]))
    cfg = load_config(args.config, args.overrides)
    # the flags win over model.*, also where the tiny policy is built or heads are fitted
    flags = {k: v for k, v in (("name", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    try:
        cfg = replace(cfg, model=replace(cfg.model, **flags))
    except ValueError as e:  # e.g. --model tiny with a gsm8k preset, or --device gpu
        raise ConfigError(f"--model/--device/--dtype: {e}") from None
    try:
        sampling = replace(cfg.sampling, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens or cfg.sampling.max_new_tokens)
    except ValueError as e:
        raise ConfigError(f"--temperature/--max-new-tokens: {e}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, heads, tok, model_dir, heads_dir, device, dtype = _load(args, cfg)
    K = heads.config.num_depths
    deep = [k for m, k in modes if m == "fixed" and k > K]
    if deep:
        raise ConfigError(f"--spec fixed:{max(deep)}: the heads have {K} depths; draft at most fixed:{K}, "
                          "or fit deeper heads (heads.num_depths=...)")
    sampling = replace(sampling, stop_token_ids=[tok.eos_id])
    seed = cfg.seed if args.seed is None else args.seed
    n_prompts = {b: args.prompts or max(2 * b, 8) for b in batches}
    task = make_task(cfg.task, chat=tok.apply_chat)
    prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(max(n_prompts.values()), seed)]
    hf_model = None
    if args.hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    machine = machine_name(device)
    label = {"model": args.model or cfg.model.name, "device": machine,
             "dtype": str(dtype).removeprefix("torch.")}
    print(f"specroll bench: model {model_dir}, heads {heads_dir} ({heads.config.kind}, {K} depths), "
          f"{machine}, torch threads {torch.get_num_threads()}, dtype {str(dtype).removeprefix('torch.')}, "
          f"temperature {sampling.temperature}, max_new_tokens {sampling.max_new_tokens}, "
          f"rounds {args.repeats} (interleaved after 1 warm-up; speedups are medians of per-round "
          "ratios)", flush=True)
    hint = dtype_hint(device, dtype)
    if hint:
        print(hint, flush=True)
    rows = []
    for b in batches:
        print(f"  batch {b}: {n_prompts[b]} prompts, modes "
              f"{', '.join(m if m != 'fixed' else f'fixed:{k}' for m, k in modes)}"
              f"{', hf generate' if hf_model is not None else ''}", flush=True)
        rows += bench_batch(model, heads, hf_model, prompts[:n_prompts[b]], b, modes, sampling, cfg.spec,
                            tok, seed, args.repeats, device, label)
        if args.json:  # keep what was measured if a later batch size fails
            write_json(rows, args.json)
    caption = ("speedups are medians of per-round ratios in this run; acc len = tokens per verify row-step; "
               "pred x = from measured acceptance and the measured decode-step rate of each run against off's, "
               "per round; achieved = x off / pred x, per round; peak MB = "
               + ("CUDA max allocated" if device.type == "cuda" else "process peak RSS so far")
               + ("; CPU timings are only ratios" if device.type == "cpu" else ""))
    print_table(rows, f"specroll bench on {machine}", caption)
    if args.markdown:
        Path(args.markdown).write_text(f"specroll bench on {machine}; {caption}\n\n" + markdown_table(rows))
        print(f"wrote {args.markdown}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
