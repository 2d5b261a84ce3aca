"""Chat templates: a broken one leaves the model loadable and plain prompts working, and fails chat prompts
with one clear line (RequestError: the server answers it with a 400)."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_models import CHAT_TEMPLATE, train_tokenizer

from perfxllm.errors import RequestError
from perfxllm.model import tokenizer
from perfxllm.model.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer()


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{% for %}", "the model's chat template is invalid: Expected an expression"),
        (5, "the model's chat_template is 5, not a string"),
        (["{{ messages }}"], 'chat_template list has an entry that is not {"name", "template"}'),
        ([{"name": "default"}], 'chat_template list has an entry that is not {"name", "template"}'),
        ('{{ "x" * 1000000000000000 }}', "chat template failed: it ran out of memory"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template failed: maximum recursion depth"),
    ],
    ids=["syntax error", "a number", "a list of strings", "an entry without template", "huge", "recursive"],
)
def test_broken_template_fails_chat_prompts_only(trained, template: Any, needle: str) -> None:
    tok = Tokenizer(trained, {"chat_template": template})
    assert tok.encode("hi") == trained.encode("hi").ids
    with pytest.raises(RequestError) as e:
        tok.encode_chat(MESSAGES)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_template_render_is_bounded(trained, monkeypatch) -> None:
    """Loops inside loops (each range() is within the sandbox's bound) stop at the time bound, with output or
    without; output that outgrows the size bound stops there. Each is one line, and the next render works."""
    monkeypatch.setattr(tokenizer, "RENDER_SECONDS", 0.2)
    monkeypatch.setattr(tokenizer, "RENDER_MAX_CHARS", 10**6)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"
    cases = [
        (loops.replace("BODY", ""), "chat template failed: it ran for over 0.2 s"),
        (loops.replace("BODY", "{{ j }}"), "chat template failed: its output passed 1000000 characters"),
        ('{{ "x" * 2000000 }}', "chat template failed: its output passed 1000000 characters"),
    ]
    for template, needle in cases:
        tok = Tokenizer(trained, {"chat_template": template})
        with pytest.raises(RequestError) as e:
            tok.encode_chat(MESSAGES)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert Tokenizer(trained, {"chat_template": CHAT_TEMPLATE}).apply_chat_template(MESSAGES)


def test_named_template_list(trained) -> None:
    templates = [
        {"name": "tool_use", "template": "{% for %}"},
        {"name": "default", "template": CHAT_TEMPLATE},
    ]
    rendered = Tokenizer(trained, {"chat_template": templates}).apply_chat_template(MESSAGES)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
