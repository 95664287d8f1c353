"""Tokenizer of a checkpoint: ``tokenizer.json`` plus ``tokenizer_config.json``.

Encoding adds the special tokens the tokenizer's own post-processor defines (BOS for
Llama), exactly as Hugging Face's fast tokenizer does. Chat messages are rendered with
the checkpoint's Jinja chat template, the same way ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    """The tokenizer files are missing or broken, or a chat request cannot be rendered."""


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
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        eos = set(extra_eos_ids) | self._generation_eos(directory / "generation_config.json")
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = frozenset(eos)
        self._compiled_template = None

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

    @staticmethod
    def _generation_eos(path: Path) -> set[int]:
        if not path.exists():
            return set()
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise TokenizerError(f"{path}: not a valid generation config") from None
        values = value if isinstance(value, list) else [value]
        return {v for v in values if isinstance(v, int)}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Render chat messages into a prompt string with the checkpoint's chat template."""
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template (tokenizer_config.json 'chat_template'); "
                "send plain prompts (/v1/completions) instead of messages"
            )
        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_template(self.chat_template, self._config_path)
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TokenizerError:
            raise
        except Exception as exc:  # jinja2 errors of any kind from a user-supplied template
            raise TokenizerError(f"chat template failed to render these messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The rendered template already carries BOS and friends, as in apply_chat_template.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


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
