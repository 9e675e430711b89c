import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random char-level policy for the arithmetic alphabet, as an HF folder (with its
    tokenizer), for end-to-end tests of fit-heads and train."""
    import torch

    from experiments.pretrain import ARITH_ALPHABET
    from experiments.tokenizer import TextTokenizer, build_char_tokenizer
    from rollout.checkpoint import save_checkpoint
    from rollout.model import ModelConfig, Transformer

    root = tmp_path_factory.mktemp("policy")
    tok = TextTokenizer(build_char_tokenizer(ARITH_ALPHABET))
    tok.save(str(root / "tok"))
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(mc)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.25)
    save_checkpoint(model, str(root / "tiny"), tokenizer_dir_or_file=str(root / "tok"))
    return str(root / "tiny")
