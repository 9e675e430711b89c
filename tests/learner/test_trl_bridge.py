"""TRL's GRPOTrainer on specroll rollouts (learner/trl_bridge.py), on tiny transformers models.

One two-step GRPO run per model family (module fixture) whose generations come from specroll's
engine, with fresh sequential heads re-fitted after every step. Checked: TRL trains on exactly
the bridge's tokens; the behaviour log-probs equal the trainer's own recompute (fp32, 1e-5);
after each step the engine holds the trainer's updated weights; policy and heads carry one
version; a re-fit happened; the metrics reach TRL's logs and TensorBoard.
"""
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL bridge needs the extra: pip install 'specroll[trl]'")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402

from experiments.pretrain import ARITH_ALPHABET  # noqa: E402
from experiments.tokenizer import build_char_tokenizer  # noqa: E402
from learner.config import RefitConfig  # noqa: E402
from learner.trl_bridge import SpecrollRollout, TRLRolloutConfig  # noqa: E402
from rollout.checkpoint import policy_state_from_hf  # noqa: E402
from rollout.types import RolloutConfig, SpecParams  # noqa: E402
from spec_heads.heads import HeadConfig  # noqa: E402

STEPS = 2


def tiny_tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_object=build_char_tokenizer(ARITH_ALPHABET),
                                                pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(kind: str, tok):
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=kind == "qwen2", eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None)
    config = transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper than HF's init, so log-probs differ visibly between tokens (a tied
        # head at 0.5 would make every next token a near-certain repeat of the last one)
        model.get_input_embeddings().weight.normal_(0, 0.05 if config.tie_word_embeddings else 0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def ones(completions, **kwargs):
    """A reward with spread inside each group, so every step has a gradient."""
    return [float(c.count("1")) for c in completions]


class Run:
    """What one two-step run leaves: per generation, (TRL's batch, the bridge's batch, the
    trainer's recomputed log-probs); per publish, the max |engine - trainer| weight difference."""

    def __init__(self):
        self.batches, self.weight_diffs, self.initial = [], [], None


def _train(kind: str, tmp_path) -> tuple:
    tok = tiny_tokenizer()
    model = tiny_model(kind, tok)
    run = Run()
    run.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prompts = ["12+34=", "7-5=", "100+1=", "9+99="]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, max_steps=STEPS, learning_rate=3e-2, logging_steps=1,
                          report_to="tensorboard", bf16=False, use_cpu=True,
                          save_strategy="no", seed=0, temperature=1.0, gradient_checkpointing=False)
    bridge = SpecrollRollout(HeadConfig(kind="sequential", num_depths=2), TRLRolloutConfig(
        spec=SpecParams(mode="fixed", k=2), rollout=RolloutConfig(max_batch=8),
        refit=RefitConfig(schedule="every", every=1, steps=8, lr=3e-3, loss="kl", micro_batch_size=4)))
    trainer = trl.GRPOTrainer(model=model, reward_funcs=ones, args=args, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": prompts * 4}), rollout_func=bridge)
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                     out["completion_ids"].shape[1])
        run.batches.append((out, bridge.last_batch, logps))
        return out

    trainer._generate_and_score_completions = spy
    publish = bridge.publish

    def checked_publish(step):
        metrics = publish(step)
        ours = bridge.worker.engine.model.state_dict()
        theirs = policy_state_from_hf(bridge.learner.policy.config, trainer.model.state_dict().items())
        run.weight_diffs.append(max((ours[k] - v).abs().max().item() for k, v in theirs.items()))
        return metrics

    bridge.publish = checked_publish
    trainer.train()
    return trainer, bridge, run


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory):
    return _train(request.param, tmp_path_factory.mktemp(request.param))


def test_trl_trains_on_the_bridges_tokens(trained):
    trainer, bridge, run = trained
    assert len(run.batches) == STEPS
    for out, batch, _ in run.batches:
        got = [row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"])]
        assert got == [s.tokens for s in batch.sequences]
        prompts = [row[m.bool()].tolist() for row, m in zip(out["prompt_ids"], out["prompt_mask"])]
        assert prompts == [s.prompt for s in batch.sequences]
    # the drafts were really verified: speculative steps ran on the engine
    assert sum(run.batches[0][1].stats.drafted_per_pos) > 0


def test_behaviour_logprobs_equal_the_trainers_recompute(trained):
    _, _, run = trained
    for out, _, recomputed in run.batches:
        mask = out["completion_mask"].bool()
        ours = out["sampling_per_token_logps"]
        assert mask.sum() > 0 and recomputed[mask].std() > 0.1  # not all-equal near-uniform log-probs
        assert (ours[mask] - recomputed[mask]).abs().max().item() <= 1e-5


def test_engine_holds_the_trainers_weights_after_each_step(trained):
    trainer, bridge, run = trained
    assert len(run.weight_diffs) == STEPS and max(run.weight_diffs) == 0.0
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item() for k, v in run.initial.items())
    assert moved > 1e-3  # the optimizer changed the weights, so the equality above means a sync


def test_heads_refit_and_publish_with_the_policys_version(trained):
    trainer, bridge, _ = trained
    assert bridge.worker.versions() == {"policy": STEPS, "heads": STEPS}
    logs = [h for h in trainer.state.log_history if "specroll/refit" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    for h in logs:
        assert h["specroll/refit"] == 1.0
        assert h["specroll/heads_version"] == h["specroll/policy_version"] == h["step"]
    # what the worker drafts with is the learner's (re-fitted) heads, not the fresh ones
    served = bridge.worker.engine.heads.state_dict()
    fitted = bridge.learner.heads.state_dict()
    assert all(torch.equal(served[k], v) for k, v in fitted.items())
    assert any(h.get("specroll/refit_kept") == 1.0 for h in logs)


def test_rollout_metrics_reach_trl_logs_and_tensorboard(trained):
    trainer, _, _ = trained
    step_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(step_logs) == STEPS
    for h in step_logs:
        assert h["specroll/rollout_tokens_per_s"] > 0
        assert 1.0 <= h["specroll/mean_accepted_len"] <= 3.0
        assert 0.0 <= h["specroll/accept_rate_pos1"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(Path(trainer.args.output_dir).rglob("events.out.tfevents*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0])).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/specroll/accept_rate_pos1", "train/specroll/rollout_tokens_per_s",
            "train/specroll/refit"} <= tags


def test_refuses_what_it_would_not_sample_exactly(tmp_path):
    tok = tiny_tokenizer()
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, report_to="none", bf16=False, use_cpu=True,
                          repetition_penalty=1.1)
    bridge = SpecrollRollout(None, TRLRolloutConfig(spec=SpecParams(mode="off")))
    trainer = trl.GRPOTrainer(model=tiny_model("llama", tok), reward_funcs=ones, args=args, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}), rollout_func=bridge)
    with pytest.raises(ValueError, match="repetition_penalty: 1.1"):
        trainer.train()
    with pytest.raises(ValueError, match="heads: spec.mode='entropy' needs draft heads"):
        SpecrollRollout(None)
    with pytest.raises(ValueError, match="refit.schedule: 'idle' needs Ray rollout workers"):
        TRLRolloutConfig(refit=RefitConfig(schedule="idle"))
