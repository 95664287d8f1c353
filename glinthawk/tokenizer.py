"""Tokenizer of a checkpoint: ``tokenizer.json`` plus ``tokenizer_config.json`` (and the
EOS ids and sampling defaults of ``generation_config.json``).

Encoding adds the special tokens the tokenizer's own post-processor defines (BOS for
Llama), exactly as Hugging Face's fast tokenizer does. Chat messages are rendered with
the checkpoint's Jinja chat template, the same way ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from glinthawk.generation_config import GenerationConfig, GenerationConfigError


class TokenizerError(ValueError):
    """The tokenizer files are missing or broken, or a chat request cannot be rendered."""


class TooManyTokens(ValueError):
    """A text certainly encodes to more than a limit, found without encoding all of it."""

    def __init__(self, at_least: int):
        super().__init__(f"at least {at_least} tokens")
        self.at_least = at_least


# A text longer than this many characters per allowed token is counted, chunk by chunk, before
# it is encoded: encoding costs some hundred times its size, so a huge prompt must fail first.
DIRECT_CHARS_PER_TOKEN = 8
COUNT_CHUNK_CHARS = 32 * 1024
# Tokens a cut can save against encoding the text whole (merges across the cut, a prefix the
# normalizer adds to each chunk). Cuts fall at whitespace; a chunk holds thousands of tokens.
CUT_MARGIN_TOKENS = 16


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, directory: str | Path, extra_eos_ids: tuple[int, ...] = ()):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{path}: missing; glinthawk needs a Hugging Face fast tokenizer (tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise TokenizerError(f"{path}: cannot load tokenizer ({exc})") from None
        self._config_path = directory / "tokenizer_config.json"
        config = self._read_config(self._config_path)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template, self._template_path = _chat_template(directory, config)
        # generation_config.json's EOS ids (Llama 3 lists several) and the sampling defaults
        # that requests leaving a field out take (requests.Request.unset, new_sequence).
        try:
            self.generation = GenerationConfig.from_directory(directory)
        except GenerationConfigError as exc:
            raise TokenizerError(str(exc)) from None
        eos = set(extra_eos_ids) | self.generation.eos_token_ids
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)
        self._compiled_template = None
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self._pieces: dict[int, tuple[str, bytes]] = {}

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        if not path.exists():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{path}: expected a JSON object")
        return config

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def json_text(self) -> str:
        """The tokenizer as ``tokenizer.json`` holds it (what a grammar library loads)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True) -> list[int]:
        """``encode(text)``, or TooManyTokens when the text certainly encodes to more than ``limit`` tokens.

        Memory and time stay bounded by ``limit``, not by the text: a long text is counted in
        chunks first, and only one that may fit is encoded whole (so exactly as ``encode``).
        """
        if len(text) > max(COUNT_CHUNK_CHARS, DIRECT_CHARS_PER_TOKEN * max(limit, 0)):
            at_least = self._count_past(text, limit)
            if at_least is not None:
                raise TooManyTokens(at_least)
        return self.encode(text, add_special_tokens)

    def _count_past(self, text: str, limit: int) -> int | None:
        """A count of text's tokens proven above ``limit`` (stopping as soon as it is), or None."""
        counted, start = 0, 0
        while start < len(text):
            end = _cut(text, start, COUNT_CHUNK_CHARS)
            counted += len(self._tok.encode(text[start:end], add_special_tokens=False).ids)
            start = end
            if start < len(text):
                counted -= CUT_MARGIN_TOKENS
            if counted > limit:
                return counted
        return None

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    @property
    def decode_concatenates(self) -> bool:
        """decode(a + b) == decode(a) + decode(b) whenever decode(a) ends on a complete character:
        true of a plain byte-level decoder (bytes of each token, then one lossy UTF-8 decode)."""
        return isinstance(self._tok.decoder, decoders.ByteLevel)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """A token's UTF-8 bytes and its text as OpenAI shows it: the text, or for bytes that are
        not whole characters, ``bytes:\\xe2\\x80``. A special token is its own name."""
        cached = self._pieces.get(token_id)
        if cached is not None:
            return cached
        raw = self._tok.id_to_token(token_id) or ""
        if token_id in self._special_ids:
            data = raw.encode()
        elif self._byte_level:
            table = _byte_decoder()
            data = bytes(table[c] for c in raw) if all(c in table for c in raw) else raw.encode()
        elif match := _BYTE_FALLBACK.fullmatch(raw):  # SentencePiece's bytes of a rare character
            data = bytes([int(match[1], 16)])
        else:
            data = raw.replace("\u2581", " ").encode()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        self._pieces[token_id] = text, data
        return text, data

    def render_chat(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> str:
        """Render chat messages into a prompt string with the checkpoint's chat template;
        ``template_kwargs`` (a request's ``chat_template_kwargs``) are its further variables,
        such as Qwen3's ``enable_thinking``."""
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template (chat_template.jinja, tokenizer_config.json 'chat_template' or "
                "chat_template.json); "
                "send plain prompts (/v1/completions) instead of messages"
            )
        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_template(self.chat_template, self._template_path)
            variables = {"add_generation_prompt": True, **(template_kwargs or {}), "messages": messages,
                         "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
            return self._compiled_template.render(**variables)
        except TokenizerError:
            raise
        except Exception as exc:  # jinja2 errors of any kind from a user-supplied template
            raise TokenizerError(f"chat template failed to render these messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], limit: int | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Render and encode chat messages; with ``limit``, as ``encode_within`` (TooManyTokens)."""
        # The rendered template already carries BOS and friends, as in apply_chat_template.
        text = self.render_chat(messages, template_kwargs)
        if limit is None:
            return self.encode(text, add_special_tokens=False)
        return self.encode_within(text, limit, add_special_tokens=False)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _cut(text: str, start: int, size: int) -> int:
    """Where a counting chunk from ``start`` ends: at the start of a whitespace run in its second
    half, where pre-tokenizers split anyway; else (no whitespace) after ``size`` characters."""
    end = start + size
    if end >= len(text):
        return len(text)
    low = start + size // 2
    cut = max(text.rfind(" ", low, end), text.rfind("\n", low, end), text.rfind("\t", low, end))
    if cut < 0:
        return end
    while cut > low and text[cut - 1].isspace():
        cut -= 1
    return cut


def _chat_template(directory: Path, config: dict[str, Any]) -> tuple[str | None, Path]:
    """The checkpoint's chat template and the file it comes from, where transformers finds it:
    ``chat_template.jinja`` (how transformers 5 saves it) before tokenizer_config.json's
    ``chat_template``, and the older processors' ``chat_template.json`` last."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), jinja
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{jinja}: cannot read the chat template ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str):
        return template, directory / "tokenizer_config.json"
    legacy = directory / "chat_template.json"
    template = Tokenizer._read_config(legacy).get("chat_template") if legacy.is_file() else None
    return (template if isinstance(template, str) else None), legacy


def _compile_template(source: str, config_path: Path):
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:  # the checkpoint's fault: say where, so it can be fixed
        raise TokenizerError(
            f"{config_path}: its 'chat_template' does not compile (line {exc.lineno}: {exc.message}); fix the "
            "template there, or send plain prompts (/v1/completions) instead of messages"
        ) from None
