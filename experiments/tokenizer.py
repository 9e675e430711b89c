"""Tokenizers, loaded one way for every model: a Hugging Face `tokenizer.json` in a folder.

`TextTokenizer` wraps a `tokenizers.Tokenizer` with the few things the product needs: the EOS
and pad ids, and the chat template from `tokenizer_config.json` (rendered with a sandboxed
jinja2, the way transformers renders it). The tiny default policy's character tokenizer is
built with the same library and saved the same way (`build_char_tokenizer`), so nothing
downstream special-cases it.

This module knows nothing about models, tasks or rewards.
"""
from __future__ import annotations

import json
import os
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Tried in order when neither tokenizer_config.json nor config.json names the EOS token.
_EOS_GUESSES = (EOS, "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


def build_char_tokenizer(alphabet: str) -> Tokenizer:
    """A character-level tokenizer: <pad>=0, <eos>=1, <unk>=2, then one id per character.

    WordLevel over single characters (every character is its own pre-token); `Fuse` decodes
    by plain concatenation, so decode(encode(s)) == s for every s over the alphabet.
    """
    chars = list(dict.fromkeys(alphabet))  # de-duplicated, order kept
    if not chars:
        raise ValueError("alphabet: must hold at least one character, got an empty string")
    clash = [c for c in chars if c in (PAD, EOS, UNK)]
    if clash:
        raise ValueError(f"alphabet: characters {clash} clash with special tokens; remove them")
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, EOS, UNK])
    return tok


def _token_str(v) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class TextTokenizer:
    """Text <-> ids, EOS/pad ids and the chat template of one model."""

    def __init__(self, tok: Tokenizer, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, bos_token: str | None = None):
        self.tok = tok
        self.eos_token = eos_token or next((t for t in _EOS_GUESSES if tok.token_to_id(t) is not None), None)
        if self.eos_token is None or tok.token_to_id(self.eos_token) is None:
            raise ValueError(f"eos_token: {self.eos_token!r} is not in the vocabulary; name the EOS token "
                             f"in tokenizer_config.json (\"eos_token\")")
        self.pad_token = pad_token if pad_token and tok.token_to_id(pad_token) is not None else None
        if self.pad_token is None:
            self.pad_token = PAD if tok.token_to_id(PAD) is not None else self.eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template

    # ids and text -----------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS added here: callers decide where a sequence starts and ends.
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat(self, prompt: str) -> str:
        """One user turn plus the generation prompt, or the prompt unchanged without a template."""
        if not self.chat_template:
            return prompt
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=self.bos_token or "", eos_token=self.eos_token)

    # disk -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "TextTokenizer":
        """Load from a model folder (tokenizer.json [+ tokenizer_config.json, config.json]) or a
        tokenizer.json file."""
        folder, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
            else (os.path.dirname(path), path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {file}; point to a Hugging Face model "
                                    f"folder that has one (slow-only tokenizers are not supported)")
        tok = Tokenizer.from_file(file)
        tc = _read_json(os.path.join(folder, "tokenizer_config.json"))
        eos = _token_str(tc.get("eos_token"))
        if eos is None:  # fall back to config.json's id
            eos_id = _read_json(os.path.join(folder, "config.json")).get("eos_token_id")
            eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
            eos = tok.id_to_token(eos_id) if isinstance(eos_id, int) else None
        template = tc.get("chat_template")
        if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
            with open(os.path.join(folder, "chat_template.jinja")) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, eos, _token_str(tc.get("pad_token")), template, _token_str(tc.get("bos_token")))

    def save(self, out_dir: str) -> None:
        """Write tokenizer.json and tokenizer_config.json into `out_dir` (each atomically)."""
        os.makedirs(out_dir, exist_ok=True)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
               "pad_token": self.pad_token}
        if self.bos_token:
            cfg["bos_token"] = self.bos_token
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        _atomic_write(os.path.join(out_dir, "tokenizer.json"), self.tok.to_str(pretty=True))
        _atomic_write(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(cfg, indent=2))


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
