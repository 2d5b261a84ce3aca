"""The tokenizer: a `tokenizers.Tokenizer` plus what tokenizer_config.json adds (special tokens, BOS, the
chat template, rendered in a sandboxed Jinja environment because templates ship inside model files)."""

from __future__ import annotations

import re
import threading
import time
from functools import cached_property
from typing import Any

import tokenizers
from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from perfxllm.errors import ModelLoadError, RequestError, shown
from perfxllm.model.config import token_ids

# Lone surrogates: bytes that are not UTF-8 on the command line or stdin (Python keeps them as U+DC80-U+DCFF),
# or a JSON string's unpaired \ud800 escape. (Escaped pairs are joined into the character they encode.)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _token_text(config: dict[str, Any], key: str) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    tok = config.get(key)
    text = tok.get("content") if isinstance(tok, dict) else tok
    if text is not None and not isinstance(text, str):
        raise ModelLoadError(
            f'tokenizer_config.json: {key} is {shown(tok)}, not a string or {{"content": ...}}'
        )
    return text


def _template_source(template: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name": ..., "template": ...} of which
    the one named "default" is used."""
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise RequestError(
                'the model\'s chat_template list has an entry that is not {"name", "template"}'
            )
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise RequestError(f"the model's chat_template is {shown(template)}, not a string")
    return template


def _raise(message: str) -> None:
    raise TemplateError(message)


# Bounds on one render. A template renders in milliseconds, but Jinja's sandbox bounds only each range() (to
# 100,000 items), not loops inside loops, and the render runs on a thread of its own in the server.
RENDER_SECONDS = 5.0
RENDER_MAX_CHARS = 2**24  # four times the server's largest request body
_render = threading.local()  # this thread's render deadline (a template is shared by the server's threads)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every call the template makes (range() among them) checking the render deadline."""

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)


def _check_deadline() -> None:
    if time.monotonic() > getattr(_render, "deadline", float("inf")):
        raise TemplateError(f"it ran for over {RENDER_SECONDS:g} s")


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
        self.tok, self.config = tokenizer, config
        self.bos_token = _token_text(config, "bos_token")
        self.eos_token = _token_text(config, "eos_token")
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = token_ids(config.get("eos_token_ids"), "tokenizer_config.json: eos_token_ids")
        if self.eos_token and tokenizer.token_to_id(self.eos_token) is not None:
            eos_ids.append(tokenizer.token_to_id(self.eos_token))
        self.eos_token_ids = sorted(set(eos_ids))
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # Hugging Face folders: the tokenizer.json post-processor decides
            add_bos = self.bos_token_id is not None and tokenizer.encode("a").ids[:1] == [self.bos_token_id]
        self.add_bos = bool(add_bos) and self.bos_token_id is not None

    @cached_property
    def _template(self) -> Template | None:
        """The chat template, compiled on first use: a broken one fails chat prompts, not loading the model."""
        source = _template_source(self.config.get("chat_template"))
        if not source:
            return None
        env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(source)
        except (TemplateError, RecursionError) as e:
            raise RequestError(f"the model's chat template is invalid: {e}") from None

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[tokenizers.Tokenizer, dict[str, Any]]]:
        # rebuilt from its parts: the compiled template does not pickle (the server's engine process sends it)
        return Tokenizer, (self.tok, self.config)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if _SURROGATE.search(text):  # the tokenizer refuses them: make them U+FFFD, as a decoder would
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            # No template shipped: a plain "role: content" transcript, as llama.cpp falls back to.
            turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return turns + ("assistant: " if add_generation_prompt else "")
        variables = dict(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        _render.deadline = time.monotonic() + RENDER_SECONDS
        pieces, size = [], 0
        try:
            for piece in self._template.generate(variables):
                size += len(piece)
                if size > RENDER_MAX_CHARS:
                    raise TemplateError(f"its output passed {RENDER_MAX_CHARS} characters")
                _check_deadline()
                pieces.append(piece)
        except (TemplateError, RecursionError) as e:
            raise RequestError(f"chat template failed: {e}") from None
        except MemoryError:
            raise RequestError("chat template failed: it ran out of memory") from None
        finally:
            del _render.deadline
        return "".join(pieces)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat prompts carry their own BOS in the template text, so none is added (as transformers does)."""
        return self.encode(self.apply_chat_template(messages), add_bos=False)
