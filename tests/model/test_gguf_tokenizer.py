"""The GGUF tokenizer against llama.cpp's own token ids (tests/data/gguf_tokenizer_ids.json, made by
scripts/make_tokenizer_fixture.py) on the default model's vocabulary, on a byte-level BPE vocabulary relabelled
with each pre-tokenizer type, and on a SentencePiece vocabulary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import pytest

from perfxllm.errors import ModelLoadError, UnsupportedError
from perfxllm.model.gguf_loader import GGUFCheckpoint, load_gguf
from perfxllm.model.gguf_tokenizer import build_tokenizer, build_tokenizer_config

FIXTURE = Path(__file__).parents[1] / "data" / "gguf_tokenizer_ids.json"


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def encode(ckpt: GGUFCheckpoint, text: str) -> list[int]:
    return ckpt.tokenizer.encode(text, add_special_tokens=False).ids


def assert_same_ids(ckpt: GGUFCheckpoint, strings: list[str], expected: list[list[int]]) -> None:
    wrong = [(s, e, encode(ckpt, s)) for s, e in zip(strings, expected, strict=True) if encode(ckpt, s) != e]
    assert not wrong, (
        f"{len(wrong)} of {len(strings)} differ from llama.cpp, e.g. (text, llama.cpp, ours): {wrong[:3]}"
    )


def write_vocab(write_gguf, path: Path, fields: dict[str, Any]) -> GGUFCheckpoint:
    """A vocabulary-only GGUF file (hyper-parameters, no tensors), loaded back."""

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(fields["model"])
        if "pre" in fields:
            writer.add_tokenizer_pre(fields["pre"])
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["token_type"])
        if "merges" in fields:
            writer.add_token_merges(fields["merges"])
        if "scores" in fields:
            writer.add_token_scores(fields["scores"])
        if "unk" in fields:
            writer.add_unk_token_id(fields["tokens"].index(fields["unk"]))

    return load_gguf(str(write_gguf(path, fill=fill)))


@pytest.fixture(scope="module")
def spm(fixture, write_gguf, tmp_path_factory) -> GGUFCheckpoint:
    vocab = fixture["spm"]["vocab"]
    return write_vocab(
        write_gguf, tmp_path_factory.mktemp("spm") / "spm.gguf", {"model": "llama", "unk": "<unk>", **vocab}
    )


def test_default_model_matches_llama_cpp(smollm2: GGUFCheckpoint, fixture) -> None:
    assert len(fixture["strings"]) >= 250
    assert_same_ids(smollm2, fixture["strings"], fixture["smollm2"])


def test_smollm_splits_digits_off_newlines_as_llama_cpp_does(smollm2: GGUFCheckpoint) -> None:
    """llama.cpp's "smollm" type first isolates each digit, then applies GPT-2's regex to the pieces, so the
    newlines before a digit stay one pre-token: ĊĊ 1 (transformers' GGUF conversion, which drops the digit
    split, gives Ċ Ċ 1)."""
    ids = encode(smollm2, "\n\n1")
    assert [smollm2.tokenizer.id_to_token(i) for i in ids] == ["ĊĊ", "1"]
    assert ids == [1116, 33]
    assert encode(smollm2, "12345") == [33, 34, 35, 36, 37]


def test_default_model_special_tokens(smollm2: GGUFCheckpoint) -> None:
    assert encode(smollm2, "<|im_start|>") == [1]
    assert encode(smollm2, "<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smollm2.tokenizer.decode([1, 4093, 2]) == "user"  # special tokens skipped
    tc = smollm2.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"], tc["add_eos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
        False,
    )
    assert tc["eos_token_ids"] == [0, 2, 4]  # llama.cpp's end-of-generation set for this file
    assert tc["chat_template"].startswith("{% for message in messages %}")


def test_default_model_round_trips(smollm2: GGUFCheckpoint, fixture) -> None:
    for s in fixture["strings"]:
        assert smollm2.tokenizer.decode(encode(smollm2, s), skip_special_tokens=False) == s


@pytest.mark.parametrize(
    "pre",
    [
        "smollm",
        "llama-bpe",
        "dbrx",
        "qwen2",
        "qwen35",
        "gpt-2",
        "default",
        "falcon",
        "deepseek-coder",
        "bloom",
    ],
)
def test_pre_tokenizer_types_match_llama_cpp(pre: str, fixture, write_gguf, tmp_path: Path) -> None:
    """The probe vocabulary's merges cross pre-token boundaries, so its ids show each type's splits."""
    probe = fixture["probe"]
    ckpt = write_vocab(write_gguf, tmp_path / "probe.gguf", {"model": "gpt2", "pre": pre, **probe})
    assert_same_ids(ckpt, fixture["strings"], probe["ids"][pre])
    for s in fixture["strings"]:
        assert ckpt.tokenizer.decode(encode(ckpt, s), skip_special_tokens=False) == s


def test_unknown_pre_tokenizer_falls_back_to_gpt2(fixture, caplog) -> None:
    probe = fixture["probe"]
    meta = {f"tokenizer.ggml.{k}": v for k, v in probe.items() if k != "ids"}
    meta |= {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "brand-new"}
    with caplog.at_level(logging.WARNING):
        tok = build_tokenizer(meta)
    assert "brand-new" in caplog.text
    for s, expected in zip(fixture["strings"], probe["ids"]["gpt-2"], strict=True):
        assert tok.encode(s, add_special_tokens=False).ids == expected


def test_sentencepiece_matches_llama_cpp(spm: GGUFCheckpoint, fixture) -> None:
    vocab = fixture["spm"]["vocab"]
    assert vocab["token_type"].count(6) == 256  # <0x00> ... <0xFF>
    assert_same_ids(spm, fixture["strings"], fixture["spm"]["ids"])


def test_sentencepiece_details(spm: GGUFCheckpoint) -> None:
    tok = spm.tokenizer
    assert tok.token_to_id("🦀") is None
    assert [tok.id_to_token(i) for i in encode(spm, "🦀")] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    ids = encode(spm, "<s>hi")
    assert tok.id_to_token(ids[0]) == "<s>" and tok.id_to_token(ids[1]).startswith(
        "▁"
    )  # space after specials
    assert spm.tokenizer_config["add_bos_token"] is True  # llama.cpp's default for SentencePiece
    assert spm.tokenizer_config["unk_token"] == "<unk>"


def test_sentencepiece_round_trips(spm: GGUFCheckpoint, fixture) -> None:
    """Except where SentencePiece itself loses text: a literal ▁, and the space it adds after special tokens."""
    vocab = fixture["spm"]["vocab"]
    specials = [t for t, kind in zip(vocab["tokens"], vocab["token_type"], strict=True) if kind in (2, 3, 4)]
    for s in fixture["strings"]:
        if "▁" not in s and not any(t in s for t in specials):
            assert spm.tokenizer.decode(encode(spm, s), skip_special_tokens=False) == s


def test_unsupported_tokenizer_model() -> None:
    with pytest.raises(UnsupportedError, match="'bert'"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]})


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"tokenizer.ggml.tokens": [1, 2]}, "tokenizer.ggml.tokens is [1, 2], not an array of strings"),
        ({"tokenizer.ggml.token_type": 1}, "tokenizer.ggml.token_type is 1, not an array of integers"),
        ({"tokenizer.ggml.merges": [1]}, "tokenizer.ggml.merges is [1], not an array of strings"),
        (
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]},
            "tokenizer.ggml.scores has 1 values for 3 tokens",
        ),
        (
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.unknown_token_id": "0"},
            "tokenizer.ggml.unknown_token_id is '0', not an integer",
        ),
    ],
    ids=["int tokens", "scalar token types", "int merges", "short scores", "string unknown id"],
)
def test_vocabulary_of_the_wrong_type(meta: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], **meta})
    assert needle in str(e.value)


@pytest.mark.parametrize("key", ["bos", "eos", "unknown"])
def test_special_token_id_that_is_a_string(key: str) -> None:
    meta = {"tokenizer.ggml.tokens": ["a", "b"], f"tokenizer.ggml.{key}_token_id": "1"}
    with pytest.raises(ModelLoadError, match=f"tokenizer.ggml.{key}_token_id is '1', not an integer"):
        build_tokenizer_config(meta)
