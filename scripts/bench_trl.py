"""TRL's GRPOTrainer with its own generation against the same trainer on specroll's rollouts.

Three arms, one GRPO config (SmolLM2-135M-Instruct on the GSM8K-style file, fp32 on the CPU):

  trl            GRPOTrainer generating with transformers' `generate` (TRL's default path)
  specroll-off   rollout_func=SpecrollRollout(...) with speculation off
  specroll-spec  rollout_func=SpecrollRollout(heads) with speculation (entropy-aware or fixed
                 depth) and on-drop re-fits

The arms run in one process, one thread each, taking turns step by step (arm 1's step r, arm 2's
step r, ...), so a shared machine's slow moments spread over all arms; each arm has its own
model copy and seed. Per step: the step's wall time (from on_step_begin until its logs, so the
bridge's weight publish is inside) and the rollout's (the trainer's `_generate`: tokenizing,
generating, decoding, for every arm). Prints a table: medians over the measured steps (the
first `--warmup` steps of each arm are dropped: engine calibration, first-call costs), and the
median and range of the per-step paired ratios TRL / arm. Writes the per-step records as JSON
and a reward-curve plot.

    PYTHONPATH=. python scripts/bench_trl.py --heads ~/.cache/specroll/models/smollm2-135m-heads-trl \
        --steps 5 --out docs/trl
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from experiments.tasks import Example, TaskConfig, make_task  # noqa: E402
from learner.config import RefitConfig  # noqa: E402
from learner.trl_bridge import SpecrollRollout, TRLRolloutConfig  # noqa: E402
from rollout.checkpoint import resolve_model  # noqa: E402
from rollout.types import RolloutConfig, SpecParams  # noqa: E402

ARMS = ("trl", "specroll-off", "specroll-spec")


class Turns:
    """Round-robin over the arms: an arm's step starts only on its turn; a finished arm drops out."""

    def __init__(self, n: int):
        self.cv, self.turn, self.live = threading.Condition(), 0, list(range(n))

    def wait(self, i: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i)

    def release(self, i: int, finished: bool = False) -> None:
        with self.cv:
            if i not in self.live:
                return
            pos = self.live.index(i)
            if finished:
                self.live.remove(i)
            if self.live:
                self.turn = self.live[(pos if finished else pos + 1) % len(self.live)]
            self.cv.notify_all()


class StepClock(TrainerCallback):
    """Wall time of each step (turn taken at on_step_begin, released once the step's logs are out)."""

    def __init__(self, arm: int, name: str, turns: Turns, records: list, gen_times: list):
        self.arm, self.name, self.turns, self.records, self.t0 = arm, name, turns, records, None
        self.gen_times = gen_times

    def on_step_begin(self, args, state, control, **kwargs):
        self.turns.wait(self.arm)
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.t0 is None or "loss" not in (logs or {}):
            return
        self.records.append({"step": state.global_step, "step_s": time.perf_counter() - self.t0,
                             "rollout_s": self.gen_times[-1] if self.gen_times else None, "reward": logs.get("reward"), **{k: v for k, v in logs.items() if "specroll/" in k}})
        print(f"step record: {self.name} {json.dumps(self.records[-1])}", flush=True)  # survives a cut-short run
        self.t0 = None
        self.turns.release(self.arm)

    def on_train_end(self, args, state, control, **kwargs):
        self.turns.release(self.arm, finished=True)


def wait_for_heads(folder: str, seconds: float) -> None:
    """Let a heads fit still running finish (the arms before this one take their first turns meanwhile)."""
    deadline = time.monotonic() + seconds
    files = [Path(folder).expanduser() / name for name in ("heads_config.json", "heads.safetensors")]
    while not all(f.is_file() for f in files) and time.monotonic() < deadline:
        time.sleep(5)


def timed_generate(trainer, times: list) -> None:
    """Record the wall time of every `_generate` call (TRL's path and the bridge's alike)."""
    inner = trainer._generate

    def generate(prompts):
        t0 = time.perf_counter()
        out = inner(prompts)
        times.append(time.perf_counter() - t0)
        return out

    trainer._generate = generate


def build_arm(name: str, a, folder: str, data: Dataset, reward) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    args = trl.GRPOConfig(output_dir=f"{a.tmp}/{name}", per_device_train_batch_size=a.prompts * a.generations,
                          num_generations=a.generations, max_completion_length=a.max_completion,
                          max_steps=a.warmup + a.steps, learning_rate=a.lr, logging_steps=1, report_to="none",
                          bf16=False, use_cpu=True, save_strategy="no", seed=a.seed, temperature=1.0,
                          gradient_checkpointing=False)  # TRL turns it on; a 135M model needs no memory saving
    rollout = None
    if name != "trl":
        spec = SpecParams(mode=a.spec_mode, k=a.k) if name == "specroll-spec" else SpecParams(mode="off")
        cfg = TRLRolloutConfig(spec=spec, rollout=RolloutConfig(max_batch=a.prompts * a.generations,
                                                                threads=a.threads),
                               refit=RefitConfig(schedule="on_drop", steps=a.refit_steps, micro_batch_size=8),
                               seed=a.seed)
        rollout = SpecrollRollout(a.heads if name == "specroll-spec" else None, cfg)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                              train_dataset=data, rollout_func=rollout)
    return trainer, rollout


def dataset(a) -> tuple[Dataset, callable]:
    task = make_task(TaskConfig(name="gsm8k", path=a.data))
    examples = task.train_prompts(a.prompts * (a.warmup + a.steps) * 4, seed=a.seed)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": ex.prompt}] for ex in examples],
                              "answer": [ex.answer for ex in examples]})

    def reward(completions, answer, **kwargs):  # the task's own reward: 1 correct, 0.1 formatted, else 0
        return [task.reward(c[0]["content"], Example(prompt="", answer=ans)) for c, ans in zip(completions, answer)]

    return data, reward


def paired(base: list[float], other: list[float]) -> tuple[float, float, float]:
    ratios = [b / o for b, o in zip(base, other) if o > 0]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(a, arms: list[str], records: dict, gen_times: dict) -> str:
    lines = ["| arm | step s (median) | rollout s (median) | step speedup vs trl (median [range]) | "
             "rollout speedup vs trl | accepted len | reward (mean) |", "|---|---|---|---|---|---|---|"]
    steps = {n: [r["step_s"] for r in records[n]][a.warmup:] for n in arms}
    gens = {n: gen_times[n][a.warmup:] for n in arms}
    for n in arms:
        s_med, g_med = statistics.median(steps[n]), statistics.median(gens[n])
        sp = paired(steps["trl"], steps[n]) if "trl" in arms else (1.0, 1.0, 1.0)
        gp = paired(gens["trl"], gens[n]) if "trl" in arms else (1.0, 1.0, 1.0)
        acc = [r.get("specroll/mean_accepted_len") for r in records[n][a.warmup:]]
        acc = statistics.median(acc) if acc and acc[0] is not None else float("nan")
        reward = statistics.mean(r["reward"] for r in records[n])
        lines.append(f"| {n} | {s_med:.1f} | {g_med:.1f} | {sp[0]:.2f}x [{sp[1]:.2f}, {sp[2]:.2f}] | "
                     f"{gp[0]:.2f}x [{gp[1]:.2f}, {gp[2]:.2f}] | {acc:.2f} | {reward:.3f} |")
    return "\n".join(lines)


def plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n, rs in records.items():
        ax.plot([r["step"] for r in rs], [r["reward"] for r in rs], marker="o", label=n)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.set_title("SmolLM2-135M GRPO (TRL), GSM8K-style")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a named model or an HF folder")
    p.add_argument("--heads", default=None, help="heads folder for the policy (specroll fit-heads); "
                   "needed by the specroll-spec arm")
    p.add_argument("--wait-heads", type=float, default=0.0,
                   help="seconds the spec arm waits for --heads to appear (a fit still running)")
    p.add_argument("--data", default="data/arith_gsm8k.jsonl")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=5, help="measured steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="steps per arm dropped from the medians")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="GRPO group size")
    p.add_argument("--max-completion", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--refit-steps", type=int, default=20)
    p.add_argument("--spec-mode", default="entropy", choices=["entropy", "fixed"],
                   help="the spec arm's drafting (fixed skips entropy mode's one-time cost probe)")
    p.add_argument("--k", type=int, default=2, help="draft depth for --spec-mode fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every arm (0: the machine's cores); 1 on a crowded machine, where "
                        "threads waiting on each other waste their share")
    p.add_argument("--tmp", default="/tmp/bench_trl")
    p.add_argument("--out", default=None, help="folder for bench_trl.json and reward.png")
    a = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    arms = a.arms.split(",")
    a.heads = os.path.expanduser(a.heads) if a.heads else None
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if "specroll-spec" in arms and not a.heads:
        p.error("--heads: the specroll-spec arm drafts with fitted heads; pass their folder (specroll fit-heads)")
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = resolve_model(a.model)
    data, reward = dataset(a)
    turns = Turns(len(arms))
    records = {n: [] for n in arms}
    gen_times = {n: [] for n in arms}
    trainers = []
    for i, n in enumerate(arms):
        trainer, _ = build_arm(n, a, folder, data, reward)
        timed_generate(trainer, gen_times[n])
        trainer.add_callback(StepClock(i, n, turns, records[n], gen_times[n]))
        trainers.append(trainer)
    errors = []

    def run(i: int) -> None:
        try:
            if arms[i] == "specroll-spec":
                wait_for_heads(a.heads, a.wait_heads)
            trainers[i].train()
        except BaseException as e:  # an arm that fails must not leave the others waiting for its turn
            errors.append((arms[i], e))
            raise
        finally:
            turns.release(i, finished=True)

    threads = [threading.Thread(target=run, args=(i,), name=n) for i, n in enumerate(arms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"error: arm {errors[0][0]} failed: {errors[0][1]!r}")
    table = report(a, arms, records, gen_times)
    print(f"SmolLM2 GRPO via TRL {trl.__version__}, {a.prompts} prompts x {a.generations} generations, "
          f"max_completion_length={a.max_completion}, {a.steps} measured steps + {a.warmup} warm-up per arm, "
          f"torch threads {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}")
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_trl.json").write_text(json.dumps({"args": vars(a), "records": records,
                                                        "rollout_s": gen_times, "table": table}, indent=1))
        plot(records, out / "reward.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
