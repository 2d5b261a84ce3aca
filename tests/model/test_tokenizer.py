"""Chat templates: a broken one leaves the model loadable and plain prompts working, and fails chat prompts
with one clear line (RequestError: the server answers it with a 400)."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_models import CHAT_TEMPLATE, train_tokenizer

from perfxllm.errors import RequestError
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


def test_named_template_list(trained) -> None:
    templates = [
        {"name": "tool_use", "template": "{% for %}"},
        {"name": "default", "template": CHAT_TEMPLATE},
    ]
    rendered = Tokenizer(trained, {"chat_template": templates}).apply_chat_template(MESSAGES)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
