"""`specroll bench` behaviour on a tiny random model: the JSON rows it writes, the --spec parser,
and errors that name the bad input. Nothing here asserts a time."""
import json
import math

import pytest
import torch

from experiments import bench
from experiments.config import ConfigError
from experiments.pretrain import ARITH_ALPHABET
from experiments.tokenizer import TextTokenizer, build_char_tokenizer
from rollout.checkpoint import save_checkpoint
from rollout.model import ModelConfig, Transformer
from spec_heads.heads import DraftHeads, HeadConfig

REQUIRED = {"mode", "k", "batch", "tokens_per_s", "speedup_vs_off", "mean_accepted_len",
            "predicted_speedup", "model", "device", "hf_tokens_per_s", "accept_rate_per_pos", "peak_mem_mb"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A random 2-layer hidden-64 policy (HF folder with a char tokenizer) and random 2-depth heads."""
    root = tmp_path_factory.mktemp("bench")
    tok = TextTokenizer(build_char_tokenizer(ARITH_ALPHABET))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    tok_dir = root / "tok"
    tok.save(str(tok_dir))
    model_dir = root / "model"
    save_checkpoint(model, str(model_dir), tokenizer_dir_or_file=str(tok_dir))
    heads = DraftHeads(HeadConfig("parallel", 2), cfg)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    heads_dir = root / "heads"
    heads.save(str(heads_dir), policy_version=0)
    return str(model_dir), str(heads_dir)


@pytest.fixture(scope="module")
def bench_rows(tiny_dirs, tmp_path_factory):
    model_dir, heads_dir = tiny_dirs
    out = tmp_path_factory.mktemp("out") / "bench.json"
    rc = bench.main(["--model", model_dir, "--heads", heads_dir, "--batch", "1,2", "--spec", "off,fixed:2",
                     "--prompts", "2", "--max-new-tokens", "6", "--repeats", "1", "--device", "cpu",
                     "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_json_has_one_row_per_configuration_with_required_keys(bench_rows, tiny_dirs):
    keys = [(r["batch"], r["mode"], r["k"]) for r in bench_rows]
    assert sorted(keys) == sorted([(b, m, k) for b in (1, 2) for m, k in (("off", 0), ("fixed", 2), ("hf", 0))])
    for r in bench_rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["model"] == tiny_dirs[0]
        assert r["dtype"] == "float32"  # a CPU's auto: every row says what it ran in
        assert r["tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0


def test_off_rows_are_the_baseline(bench_rows):
    off = [r for r in bench_rows if r["mode"] == "off"]
    assert len(off) == 2
    for r in off:
        assert r["speedup_vs_off"] == 1.0
        assert r["mean_accepted_len"] == 1.0  # exactly: one token per plain decode step
        assert r["predicted_speedup"] == 1.0
        assert r["accept_rate_per_pos"] == []


def test_speculative_rows_are_consistent(bench_rows):
    off = {r["batch"]: r["tokens_per_s"] for r in bench_rows if r["mode"] == "off"}
    for r in bench_rows:
        if r["mode"] == "hf":
            continue
        assert math.isfinite(r["predicted_speedup"]) and r["predicted_speedup"] > 0
        # one round: achieved is that round's measured over predicted speedup
        assert r["fraction_of_predicted"] == pytest.approx(r["speedup_vs_off"] / r["predicted_speedup"])
        assert math.isfinite(r["predicted_speedup_cost_model"]) and r["predicted_speedup_cost_model"] > 0
        assert r["speedup_vs_off"] == pytest.approx(r["tokens_per_s"] / off[r["batch"]])
        assert r["rounds"] == 1 and r["speedup_vs_off_rounds"] == [pytest.approx(r["speedup_vs_off"])]
        if r["mode"] == "fixed":
            assert len(r["accept_rate_per_pos"]) == 2
            assert all(0.0 <= a <= 1.0 for a in r["accept_rate_per_pos"])
            assert 1.0 <= r["mean_accepted_len"] <= 3.0  # at most k + 1 tokens per verify


@pytest.mark.parametrize("caps, device, dtype, hinted", [
    ({"avx512_bf16": True}, "cpu", torch.float32, True),
    ({"amx_bf16": True}, "cpu", torch.float32, True),
    ({"avx512_bf16": False, "amx_bf16": False}, "cpu", torch.float32, False),  # emulated bf16: slow
    ({"avx512_bf16": True}, "cpu", torch.bfloat16, False),  # already bf16
    ({"avx512_bf16": True}, "cuda", torch.float32, False),  # not a CPU run
])
def test_a_float32_run_on_a_native_bf16_cpu_is_told_about_bfloat16(monkeypatch, caps, device, dtype, hinted):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    hint = bench.dtype_hint(torch.device(device), dtype)
    assert (hint is not None) == hinted
    if hinted:
        assert "--dtype bfloat16" in hint


def test_auto_dtype_is_float32_on_a_cpu_and_bad_dtype_is_named():
    assert bench.resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert bench.resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ConfigError, match="'fp8'"):
        bench.resolve_device_dtype("cpu", "fp8")


def test_spec_parser_expands_ranges_and_keeps_order():
    assert bench.parse_spec_list(["off,fixed:1..3", "entropy"]) == [
        ("off", 0), ("fixed", 1), ("fixed", 2), ("fixed", 3), ("entropy", 0)]
    assert bench.parse_spec_list(["fixed:2,fixed:1..2"]) == [("fixed", 2), ("fixed", 1)]


@pytest.mark.parametrize("bad", ["fixed", "fixed:0", "fixed:3..1", "fixed:1..9", "greedy", "fixed:a"])
def test_spec_parser_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        bench.parse_spec_list([f"off,{bad}"])


def test_bad_spec_flag_exits_with_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--spec", "off,fixed:x"])
    assert e.value.code == 2
    assert "fixed:x" in capsys.readouterr().err


def test_batch_parser():
    assert bench.parse_batches(["1,8", "8", "32"]) == [1, 8, 32]
    with pytest.raises(ValueError, match="'0'"):
        bench.parse_batches(["1,0"])


def test_bad_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="no-such-model"):
        bench.main(["--model", missing, "--heads", str(tmp_path), "--no-hf"])


def test_fixed_depth_deeper_than_heads_is_refused(tiny_dirs):
    model_dir, heads_dir = tiny_dirs
    with pytest.raises(ConfigError, match="fixed:3"):
        bench.main(["--model", model_dir, "--heads", heads_dir, "--spec", "fixed:1..3", "--no-hf",
                    "--device", "cpu"])


def test_bad_sampling_flag_names_it(tiny_dirs):
    model_dir, heads_dir = tiny_dirs
    with pytest.raises(ConfigError, match="temperature"):
        bench.main(["--model", model_dir, "--heads", heads_dir, "--temperature", "-1", "--no-hf"])
    with pytest.raises(ConfigError, match="--repeats 0"):
        bench.main(["--model", model_dir, "--heads", heads_dir, "--repeats", "0"])


def test_overrides_may_follow_list_flags():
    args = bench.parse_args(["--batch", "1", "8", "task.digits=2", "--spec", "off", "fixed:1..2"])
    assert bench.parse_batches([str(b) for g in args.batch for b in g]) == [1, 8]
    assert [m for g in args.spec for m in g] == [("off", 0), ("fixed", 1), ("fixed", 2)]
    assert args.overrides == ["task.digits=2"]



def test_markdown_table_has_a_row_per_result():
    from experiments.bench import COLUMNS, markdown_table
    row = {"model": "m", "device": "cpu", "batch": 1, "mode": "fixed", "k": 2, "tokens_per_s": 10.0,
           "speedup_vs_off": 1.5, "speedup_vs_hf": 1.2, "mean_accepted_len": 2.5, "accept_rate_per_pos": [0.9, 0.8],
           "predicted_speedup": 1.6, "fraction_of_predicted": 0.94, "peak_mem_mb": 100.0}
    lines = markdown_table([row, dict(row, mode="off", k=0, accept_rate_per_pos=[])]).strip().splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(COLUMNS) + 1
    assert "| fixed | 2 | 10.0 | 1.50 | - | 1.20 | 2.50 | 0.90 0.80 | 1.60 | 94% | 100 |" in lines[2]
    ranged = markdown_table([dict(row, speedup_vs_off_rounds=[1.4, 1.62, 1.5])])
    assert "| 1.50 | 1.40-1.62 | 1.20 |" in ranged
    assert "| off | - |" in lines[3]


def test_predict_is_expected_tokens_per_decode_second_over_off():
    from rollout.types import RolloutStats

    # off: 100 row-steps (one token each) in 0.2 s of decode (0.05 s of its 0.25 s was prefill)
    off = RolloutStats(row_steps=100, steps=100, time_s=0.25, prefill_time_s=0.05)
    # every row-step drafted 2, acceptance 0.8 then 0.5: E = 1 + 0.8 + 0.4 = 2.2 tokens per
    # row-step; 10 row-steps in 0.02 s of decode -> 1100 tokens/s against off's 500
    spec = RolloutStats(row_steps=10, steps=10, time_s=0.03, prefill_time_s=0.01, drafted_per_pos=[10, 8],
                        accepted_per_pos=[8, 4], depth_hist=[0, 0, 10])
    assert bench.expected_decode_tokens(spec) == pytest.approx(22.0)
    assert bench.predict(spec, off) == pytest.approx(1100 / 500)
    # plain row-steps (depth 0) yield one token each, and prefill time never counts
    mixed = RolloutStats(row_steps=20, steps=20, time_s=1.0, prefill_time_s=0.96, drafted_per_pos=[10, 8],
                         accepted_per_pos=[8, 4], depth_hist=[10, 0, 10])
    assert bench.predict(mixed, off) == pytest.approx((10 + 22) / 0.04 / 500)
    assert bench.predict(off, off) == pytest.approx(1.0)


def test_cost_model_prediction_uses_the_engine_step_costs():
    from rollout.types import RolloutStats
    from spec_heads.depth import CostModel

    cost = CostModel(max_batch=8, max_tokens=5)
    for t in range(2, 6):  # a drafting step verifying t tokens costs 1 + 0.5 t ms at 4 rows
        cost.record(4, t, (1.0 + 0.5 * t) * 1e-3)
    plain = 1.2e-3
    stats = RolloutStats(drafted_per_pos=[10, 8, 0, 0], accepted_per_pos=[8, 4, 0, 0], depth_hist=[0, 0, 10, 0, 0])
    assert bench.predict_from_cost_model(stats, cost, plain, 4) == pytest.approx(2.2 / (2.5e-3 / plain))
    mixed = RolloutStats(drafted_per_pos=[10, 8, 0, 0], accepted_per_pos=[8, 4, 0, 0], depth_hist=[10, 0, 10, 0, 0])
    assert bench.predict_from_cost_model(mixed, cost, plain, 4) == pytest.approx((10 + 22) / (10 + 10 * 2.5e-3 / plain))


def test_speedups_are_medians_of_paired_per_round_ratios():
    # the machine slows down 2x in round 2: both sides of that round's ratio slow alike
    off = bench.Timed(rates=[100.0, 50.0, 100.0], stats=[])
    spec = bench.Timed(rates=[150.0, 80.0, 140.0], stats=[])
    median, rounds = spec.speedup_over(off)
    assert rounds == pytest.approx([1.5, 1.6, 1.4])
    assert median == pytest.approx(1.5)
    # a ratio of medians would have read 140 / 100 = 1.4
    assert spec.speedup_over(bench.Timed(rates=[100.0, 50.0], stats=[]))[0] == pytest.approx(1.55)


def test_rounds_alternate_the_order_of_configurations():
    """A machine that slows down steadily would favour whichever configuration runs first in
    every round; reversing every other round cancels a steady drift in the paired ratios."""
    clock = {"t": 0}
    calls = []

    def runner(name):
        def run(seed):
            clock["t"] += 1
            calls.append(name)
            return 100.0 / clock["t"], None  # the machine slows down with every run
        return run

    timed = bench.time_interleaved({"a": runner("a"), "b": runner("b")}, 4, torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2  # warm-up, then alternating rounds
    ratios = timed["b"].speedup_over(timed["a"])[1]
    assert min(ratios) < 1.0 < max(ratios)  # the drift no longer always favours one side


def test_each_round_samples_with_its_own_seed_shared_by_every_configuration():
    """With one seed for every round a configuration draws the same sample each time, and its
    luck (how many tokens it emits in as many steps) biases every paired ratio alike."""
    calls = []

    def runner(name):
        def run(seed):
            calls.append((name, seed))
            return 100.0, None
        return run

    bench.time_interleaved({"a": runner("a"), "b": runner("b")}, 3, torch.device("cpu"), seed=7)
    assert calls[:2] == [("a", 7), ("b", 7)]  # the warm-up
    rounds = [calls[i:i + 2] for i in range(2, len(calls), 2)]
    seeds = [{s for _, s in pair} for pair in rounds]
    assert all(len(s) == 1 for s in seeds)  # one seed per round, for every configuration
    assert [s.pop() for s in seeds] == [8, 9, 10]  # and a new one each round


def test_engine_runner_samples_with_the_seed_it_is_given(tiny_dirs):
    """EngineRunner's seed reaches the engine: two seeds give two samples, one seed the same."""
    from rollout.checkpoint import load_checkpoint
    from rollout.engine import Engine
    from rollout.types import SamplingParams, SpecParams

    model = load_checkpoint(tiny_dirs[0])
    heads, _ = DraftHeads.load(tiny_dirs[1], model.config)
    eng = Engine(model, heads, max_batch=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12)
    run = bench.EngineRunner(eng, prompts, sampling, SpecParams(mode="off", max_k=heads.config.num_depths), seed=0)

    def sample(seed):
        eng.depth_policy = None
        return [s.tokens for s in eng.generate(prompts, sampling, run.spec, seed=seed).sequences]

    assert sample(3) == sample(3) and sample(3) != sample(4)
    _, stats_a = run(3)
    _, stats_b = run(4)
    assert stats_a.tokens == sum(map(len, sample(3))) and stats_b.tokens == sum(map(len, sample(4)))


def test_auto_rounds_fill_the_time_budget_within_bounds():
    assert bench.auto_rounds(10.0) == 12
    assert bench.auto_rounds(100.0) == bench.MIN_ROUNDS
    assert bench.auto_rounds(0.5) == bench.MAX_ROUNDS
    assert bench.parse_repeats(["auto"]) == "auto" and bench.parse_repeats(["4"]) == 4
    with pytest.raises(ValueError, match="--repeats x"):
        bench.parse_repeats(["x"])


def test_bench_runs_where_ray_is_not_installed(tiny_dirs, tmp_path):
    """A lent GPU machine's image has torch and transformers but not Ray: `specroll bench` is one
    process and must not import it (it once did, through rollout.worker, and failed there)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    model_dir, heads_dir = tiny_dirs
    out = tmp_path / "b.json"
    block = tmp_path / "noray"
    block.mkdir()
    (block / "ray.py").write_text("raise ImportError('ray is not installed here')\n")
    code = ("import sys; from experiments import bench; "
            f"rc = bench.main(['--model', {model_dir!r}, '--heads', {heads_dir!r}, '--batch', '1', "
            f"'--spec', 'off,fixed:1', '--prompts', '1', '--max-new-tokens', '4', '--repeats', '1', "
            f"'--device', 'cpu', '--json', {str(out)!r}]); "
            "assert 'ray' not in sys.modules or sys.modules['ray'] is None; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": f"{block}:{Path(__file__).resolve().parents[2]}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"off", "fixed"} <= {r["mode"] for r in json.loads(out.read_text())}
