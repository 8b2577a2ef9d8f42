"""Tokenizer: a ``tokenizers.Tokenizer`` plus what generation needs (chat template, bos/eos).

Built from GGUF metadata (byte-level BPE), a Hugging Face model directory, or
our own saved directory (``tokenizer.json`` + ``tokenizer_meta.json``).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

META_FILE = "tokenizer_meta.json"

# GGUF token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the llama.cpp `tokenizer.ggml.pre` types that do not use GPT-2's
# own regex. Any other pre type gets GPT-2's regex (ByteLevel(use_regex=True)),
# which is what Hugging Face does for them too.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


BYTE_ALPHABET = _byte_alphabet()


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos_token: bool = False):
        # Specials (bos) are added by us, never by the backend's post-processor.
        tok.post_processor = None
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass chat=false or use a model that has one")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        special = lambda i: self.id_to_token(i) if i is not None else None  # noqa: E731
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=special(self.bos_token_id) or "",
                                     eos_token=special(eos) or "", **kwargs)

    # --- persistence ----------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        meta = {"chat_template": self.chat_template, "bos_token_id": self.bos_token_id,
                "eos_token_ids": self.eos_token_ids, "add_bos_token": self.add_bos_token}
        (d / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        d = Path(directory)
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        return cls(HFTokenizer.from_file(str(d / "tokenizer.json")), **meta)

    # --- builders ---------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """Byte-level BPE from a ``gguf.GGUFReader``'s ``tokenizer.ggml.*`` metadata."""
        meta = lambda key, default=None: (  # noqa: E731
            reader.fields[key].contents() if key in reader.fields else default)
        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens: list[str] = meta("tokenizer.ggml.tokens")
        types: list[int] = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        alphabet = set(BYTE_ALPHABET.values())
        # Tokens are stored in the byte alphabet already; respell any that are not.
        spell = lambda t: t if set(t) <= alphabet else "".join(BYTE_ALPHABET[b] for b in t.encode())  # noqa: E731
        vocab = {spell(t): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges", [])]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta("tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) must match whole in the text, never be split.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED])
        eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(tok, chat_template=meta("tokenizer.chat_template"),
                   bos_token_id=meta("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=[i for i in eos if i is not None],
                   add_bos_token=bool(meta("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d} has no tokenizer.json (only fast tokenizers are supported)")
        tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        bos = _token_content(cfg.get("bos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        eos_ids = [tok.token_to_id(_token_content(cfg["eos_token"]))] if cfg.get("eos_token") else []
        gen_eos = _read_json(d / "generation_config.json").get("eos_token_id", [])
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no flag: does the backend's post-processor prepend bos?
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(tok, chat_template=template, bos_token_id=bos_id,
                   eos_token_ids=[i for i in eos_ids if i is not None], add_bos_token=bool(add_bos))


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    Decodes a short window of previous tokens together with the new ones, so
    tokenizers whose pieces depend on context (leading spaces) come out right, and
    holds text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        # ids[prefix:read] were already emitted; they give the next piece its context.
        self._prefix = max(len(self.ids) - 6, 0)
        self._read = len(self.ids)
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read])
        full = decode(self.ids[self._prefix:])
        if len(full) <= len(prefix_text) or full.endswith("\ufffd"):
            return ""
        piece = full[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._text += piece
        return piece

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated UTF-8 sequence at the end of generation)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read])
        piece = decode(self.ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        self._text += piece
        return piece
