"""`longtail`: worked multi-step arithmetic whose answer lengths are long-tailed.

RL rollouts are dominated by a few long answers: the batch drains while they finish, which is
where speculation and a pull-based coordinator pay. This built-in task has that shape on a
CPU-sized model. A prompt "37+4*5=" asks to apply "+4" five times to 37; the worked answer
counts the steps down, one step per comma:

    5:37+4=41,4:41+4=45,3:45+4=49,2:49+4=53,1:53+4=57>57

The number of steps n is drawn from a Zipf-like law, P(n) ~ n^-chain_skew on 1..chain_max, so
most answers are a few dozen characters and a few run to several hundred. Each step depends only
on the step before it (the counter minus one, the total plus the operand), so a character-level
model of ~1M parameters learns the format in minutes and gets long chains partly wrong: RL has
room to improve. (The prompt also reads as ordinary arithmetic: 37+4*5 = 57.)

Reward (`Task.reward`): 1.0 if the completion is a well-formed worked chain with exactly n steps
whose number after the final '>' equals the result; `format_reward` if it is a well-formed chain
but wrong (wrong result or wrong number of steps); 0.0 otherwise. Never raises.

This module knows nothing about models; `bench_setup` (for `specroll bench` and the draining
rollout benchmarks) resolves the tiny policy and heads through experiments.fit_heads.
"""
from __future__ import annotations

import itertools
import random
import re

from experiments.tasks import Example, GeneratedTask, TaskConfig, _norm_int

LONGTAIL_ALPHABET = "0123456789+-*=:,>"
_START_MAX = 99  # the chain starts at 0..99; totals stay 1-3 digits over 30 steps of +-9
_OPERAND_MAX = 9  # one-digit operands: each step is a short local sum a tiny model learns
_STEP = r"\d+:-?\d+[+-]\d=-?\d+"
_WORKED = re.compile(rf"({_STEP}(?:,{_STEP})*)>(-?\d+)")
_PROMPT = re.compile(r"(\d+)([+-])(\d)\*(\d+)=")


def worked_chain(start: int, op: str, operand: int, steps: int) -> str:
    """"5:37+4=41,4:41+4=45,...,1:53+4=57>57": the counter counts down from `steps`."""
    parts, total = [], start
    for left in range(steps, 0, -1):
        new = total + operand if op == "+" else total - operand
        parts.append(f"{left}:{total}{op}{operand}={new}")
        total = new
    return ",".join(parts) + f">{total}"


def chain_weights(chain_max: int, skew: float) -> list[float]:
    """Unnormalised P(n) ~ n^-skew for n = 1..chain_max."""
    return [n ** -skew for n in range(1, chain_max + 1)]


class LongTailTask(GeneratedTask):
    """Worked chains of `n` repeated one-digit additions (or subtractions, per task.ops), n
    long-tailed on 1..task.chain_max (see the module docstring). Eval prompts are a fixed set,
    hashed out of the training distribution like the arithmetic task's."""

    name = "longtail"
    _EVAL_SEED = 0x7A11

    def __init__(self, cfg: TaskConfig):
        self.ops, self.eval_size, self.format_reward = cfg.ops, cfg.eval_size, cfg.format_reward
        self._cum = list(itertools.accumulate(chain_weights(cfg.chain_max, cfg.chain_skew)))
        self._steps = list(range(1, cfg.chain_max + 1))
        self._eval: list[Example] | None = None

    def _draw(self, rng: random.Random) -> Example:
        n = rng.choices(self._steps, cum_weights=self._cum)[0]
        op = rng.choice(self.ops)
        start, operand = rng.randint(0, _START_MAX), rng.randint(1, _OPERAND_MAX)
        target = worked_chain(start, op, operand, n)
        return Example(prompt=f"{start}{op}{operand}*{n}=", answer=target.rsplit(">", 1)[1], target=target)

    def _exhausted(self, found: int) -> str:
        return f"eval_size: only {found} held-out chains were found; lower task.eval_size"

    def reward_parts(self, completion: str, ex: Example) -> dict:
        if not isinstance(completion, str):
            return {"correct": 0.0, "format": 0.0}
        m = _WORKED.fullmatch(completion.strip())
        if m is None:
            return {"correct": 0.0, "format": 0.0}
        spec = _PROMPT.fullmatch(ex.prompt)
        steps_asked = _norm_int(spec.group(4)) if spec else None
        steps_written = str(m.group(1).count(",") + 1)
        correct = _norm_int(m.group(2)) == _norm_int(ex.answer) and steps_written == steps_asked
        return {"correct": float(correct), "format": 1.0}


def bench_setup(cfg, n: int, seed: int | None = None) -> dict:
    """What a draining-rollout benchmark on this task needs: `n` training prompts (text and token
    ids, seeded), the tiny policy's folder and its fitted heads' folder (built and fitted first
    if missing, as `specroll train` does). `cfg` is a run Config with task.name=longtail
    (e.g. `load_config("longtail")`)."""
    from experiments.fit_heads import ensure_heads, policy_dir
    from experiments.tasks import make_task
    from experiments.tokenizer import TextTokenizer

    if cfg.task.name != "longtail":
        raise ValueError(f"task.name: bench_setup serves the longtail task, got {cfg.task.name!r}; "
                         "load the longtail preset (load_config('longtail'))")
    model_dir = policy_dir(cfg)
    tok = TextTokenizer.from_dir(model_dir)
    examples = make_task(cfg.task).train_prompts(n, seed=cfg.seed if seed is None else seed)
    return {"model_dir": model_dir, "heads_dir": ensure_heads(cfg, model_dir), "examples": examples,
            "prompts": [tok.encode(ex.prompt) for ex in examples]}
