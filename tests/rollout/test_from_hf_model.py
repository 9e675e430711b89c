"""rollout.checkpoint.from_hf_model / policy_state_from_hf: a transformers model object in memory
becomes the policy (what the TRL bridge does at its first rollout and after every step)."""
import pytest
import torch

from rollout.checkpoint import from_hf_model, policy_state_from_hf

transformers = pytest.importorskip("transformers")


def hf_model(kind: str, tied: bool, seed: int):
    common = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    config = transformers.LlamaConfig(**common) if kind == "llama" else transformers.Qwen2Config(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # spread wider than HF's init: logits differ visibly
            param.copy_(1 + 0.1 * torch.randn_like(param)) if name.endswith("norm.weight") else param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)])
def test_from_hf_model_computes_what_transformers_computes(kind, tied):
    hf = hf_model(kind, tied, seed=0)
    ours = from_hf_model(hf)
    assert ours.config.tie_word_embeddings == tied and ours.config.model_type == kind
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ours(ids))
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4
    # the weights are a copy: training the HF model does not move ours until a sync
    with torch.no_grad():
        hf.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(ours.embed_tokens.weight, hf.get_input_embeddings().weight)


@pytest.mark.parametrize("tied", [False, True])
def test_policy_state_from_hf_syncs_new_weights(tied):
    ours = from_hf_model(hf_model("llama", tied, seed=0))
    other = hf_model("llama", tied, seed=1)
    ours.load_state_dict(policy_state_from_hf(ours.config, other.state_dict().items()))
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - other(ids).logits).abs().max().item() <= 1e-4
    if tied:
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_policy_state_from_hf_names_keys_that_do_not_fit():
    ours = from_hf_model(hf_model("llama", False, seed=0))
    state = dict(hf_model("llama", False, seed=0).state_dict())
    state["model.layers.0.mlp.up_proj.bias"] = torch.zeros(128)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\], unexpected \['layers.0.mlp.up_proj.bias'\]"):
        policy_state_from_hf(ours.config, state.items(), where="LlamaForCausalLM")
