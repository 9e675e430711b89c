#!/usr/bin/env python3
"""How often the entropy policy drafts, and the token rate it gets, on a simulated machine whose
step times are noisy: drafting truly delivers `adv` x the tokens per second of plain steps,
every step's time is multiplied by exp(N(0, sigma)). Compares the policy as it is with plain
steps forced to every 64th (the rule before plain steps came every 8th near the bar). One row,
4000 steps, 6 seeds each; rate 1.0 = all plain. Run from the repository root:
    python scripts/simulate_depth_policy.py
Prints a table; asserts nothing."""
import math
import random
import sys

sys.path[:0] = ["tests/spec_heads", "."]
from test_depth import observed_policy  # noqa: E402  (the tests' policy that has seen heads and timings)


def run(adv: float, sigma: float, seed: int, every: int | None, steps: int = 4000):
    random.seed(seed)
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 3.6)
    if every is not None:
        policy._plain_every = lambda key: every
    tokens_per_draft = policy.expected_tokens(4)
    draft_s = tokens_per_draft / adv
    drafted, seconds, tokens = 0, 0.0, 0.0
    for _ in range(steps):
        _, depth, _ = policy.plan_step(1)
        cost = 1.0 if depth == 0 else draft_s
        policy.record_step(1, 1 + depth, cost * math.exp(random.gauss(0.0, sigma)))
        drafted += depth > 0
        seconds += cost
        tokens += 1.0 if depth == 0 else tokens_per_draft
    return drafted / steps, tokens / seconds


print("| rule | true advantage | noise | drafted steps | rate vs all-plain |\n|---|---|---|---|---|")
for label, every in (("every 64th plain", 64), ("as built", None)):
    for adv in (0.90, 0.97, 1.03, 1.10, 1.20):
        for sigma in (0.05, 0.15, 0.30):
            res = [run(adv, sigma, s, every) for s in range(6)]
            print(f"| {label} | {adv:.2f} | {sigma:.2f} | {sum(r[0] for r in res) / 6:.2f} | "
                  f"{sum(r[1] for r in res) / 6:.3f} |", flush=True)
