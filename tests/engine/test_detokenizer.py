"""Incremental detokenization with real byte-level BPE tokenizers: streamed deltas, multi-byte characters
split across tokens, and stop strings that span token boundaries."""

from __future__ import annotations

import importlib.util

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from perfxllm.engine.detokenizer import Detokenizer
from perfxllm.model.tokenizer import Tokenizer

SENTENCES = [
    "héllo 世界 🙂 and héllo again",
    "The END of the story. The end.",
    "naïve café, 日本語のテキスト, emoji 🙂🎉",
    "stop words: STOP, END, ###",
]
TEXTS = [
    "héllo 世界 🙂",
    "A naïve café — 日本語 🎉🙂 done.",
    "plain ascii text, nothing special",
    "🙂🙂🙂 世界世界",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(SENTENCES * 5, trainer)
    return Tokenizer(t, {"eos_token": "<eos>"})


@pytest.fixture(scope="module")
def default_tok() -> Tokenizer:
    """The default model's tokenizer (a GGUF file), when its loader is there and works."""
    if importlib.util.find_spec("perfxllm.model.gguf_loader") is None:
        pytest.skip("perfxllm.model.gguf_loader is not there")
    from perfxllm.model.loader import open_checkpoint

    try:
        return open_checkpoint(None).tokenizer
    except Exception as e:  # not installed, or the loader is still being written
        pytest.skip(f"the default model's tokenizer did not load: {e}")


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    table = bytes_to_unicode()
    ids = [tok.tok.token_to_id(table[b]) for b in text.encode()]
    assert None not in ids
    return ids


def token_ids(tok: Tokenizer, pieces: list[str]) -> list[int]:
    """Ids whose tokens decode to exactly these pieces (each piece encoded on its own)."""
    ids = []
    for p in pieces:
        ids += tok.encode(p, add_bos=False)
    return ids


def stream(tok: Tokenizer, ids: list[int], stop: list[str] = ()) -> tuple[list[str], bool, Detokenizer]:
    d = Detokenizer(tok, list(stop))
    deltas = []
    for i in ids:
        delta, hit = d.add(i)
        deltas.append(delta)
        if hit:
            return deltas, True, d
    return deltas, False, d


def test_trained_tokenizer_splits_multibyte_characters(tok):
    """The fixture is only useful if some token boundary falls inside a character."""
    ids = tok.encode("世界 🙂 日本語")
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), pieces


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tok, text):
    for ids in (tok.encode(text), byte_ids(tok, text)):
        deltas, hit, d = stream(tok, ids)
        assert not hit
        assert "".join(deltas) + d.flush() == tok.decode(ids) == text
        assert "".join(deltas) == text  # nothing held back without stop strings
        assert not any("\ufffd" in x for x in deltas)


def test_a_multibyte_character_is_released_whole(tok):
    deltas, _, _ = stream(tok, byte_ids(tok, "a🙂b"))
    assert deltas == ["a", "", "", "", "🙂", "b"]
    deltas, _, _ = stream(tok, byte_ids(tok, "世界"))
    assert deltas == ["", "", "世", "", "", "界"]


def test_stop_string_split_over_single_character_tokens(tok):
    ids = token_ids(tok, ["abc ", "E", "N", "D", " after"])
    deltas, hit, d = stream(tok, ids, ["END"])
    assert hit
    assert "".join(deltas) == "abc "
    assert deltas[-3:] == ["", "", ""]  # "E" and "EN" were held back, never emitted
    assert d.text == "abc "


def test_stop_string_inside_one_token_and_text_after_it(tok):
    ids = byte_ids(tok, "xy") + token_ids(tok, ["The END of"])
    deltas, hit, _ = stream(tok, ids, ["END"])
    assert hit and "".join(deltas) == "xyThe "


def test_stop_string_spanning_a_multibyte_character(tok):
    ids = byte_ids(tok, "ok 世界 later")
    deltas, hit, _ = stream(tok, ids, ["世界"])
    assert hit and "".join(deltas) == "ok "
    assert not any("\ufffd" in x or "世" in x for x in deltas)


def test_earliest_of_several_stop_strings(tok):
    ids = byte_ids(tok, "one ### two STOP")
    deltas, hit, _ = stream(tok, ids, ["STOP", "###"])
    assert hit and "".join(deltas) == "one "


def test_stop_string_at_the_start(tok):
    deltas, hit, d = stream(tok, byte_ids(tok, "END"), ["END"])
    assert hit and deltas == ["", "", ""] and d.text == ""


def test_partial_stop_that_does_not_complete_is_released_later(tok):
    ids = byte_ids(tok, "xEN") + byte_ids(tok, "Xy")
    deltas, hit, _ = stream(tok, ids, ["END"])
    assert not hit
    assert deltas == ["x", "", "", "ENX", "y"]


def test_flush_releases_a_held_back_partial_stop(tok):
    deltas, hit, d = stream(tok, byte_ids(tok, "wait EN"), ["END"])
    assert not hit and "".join(deltas) == "wait "
    assert d.flush() == "EN"
    assert d.flush() == ""


def test_the_longest_possible_stop_prefix_is_held(tok):
    # "AAB" could become "AABC"; holding back only "AB" (a prefix of "ABX") would emit an "A" that belongs
    # to the stop string.
    deltas, hit, _ = stream(tok, byte_ids(tok, "zAABC"), ["AABC", "ABX"])
    assert hit and "".join(deltas) == "z"


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_tokenizer_streams_exactly(default_tok, text):
    ids = default_tok.encode(text, add_bos=False)
    deltas, hit, d = stream(default_tok, ids)
    assert not hit and not any("\ufffd" in x for x in deltas)
    assert "".join(deltas) + d.flush() == default_tok.decode(ids)


def test_default_model_tokenizer_stop_string(default_tok):
    text = "héllo 世界 🙂 END of it"
    ids = default_tok.encode(text, add_bos=False)
    for stop in (["END"], ["世界"], ["🙂"], ["lo 世"]):
        deltas, hit, _ = stream(default_tok, ids, stop)
        assert hit and "".join(deltas) == text[: text.index(stop[0])]


def test_stop_string_completed_by_a_token_that_ends_inside_a_character():
    """A token "D" + the first byte of "世": the stop "END" is complete although the text ends in an
    incomplete character; it must still be found, and flush() must not release it."""
    table = bytes_to_unicode()
    vocab = {c: b for b, c in table.items()}
    d_lead = "D" + table["世".encode()[0]]
    vocab[d_lead] = 256
    bpe = tokenizers.Tokenizer(models.BPE(vocab, [("D", table["世".encode()[0]])]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    t = Tokenizer(bpe, {})
    tail = [vocab[table[b]] for b in "世".encode()[1:]]
    ids = [vocab["a"], vocab["E"], vocab["N"], 256, *tail]
    assert t.decode(ids) == "aEND世"
    deltas, hit, _ = stream(t, ids, ["END"])
    assert hit and "".join(deltas) == "a" and len(deltas) == 4


def test_sentencepiece_leading_space_of_the_answer_is_kept():
    """Metaspace decoders drop the first token's leading space; decoding behind the prompt keeps it."""
    vocab = {"<unk>": 0, "▁The": 1, "▁capital": 2, "▁is": 3, "▁Paris": 4, ".": 5}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = Tokenizer(tok, {})
    assert tokenizer.decode([4]) == "Paris"  # the problem: alone, the space is gone
    prompt = tokenizer.encode("The capital is")
    d = Detokenizer(tokenizer, [], prompt)
    text = d.add(4)[0] + d.add(5)[0] + d.flush()
    assert text == " Paris."
