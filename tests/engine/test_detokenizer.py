"""Incremental detokenization with real byte-level BPE tokenizers: streamed deltas, multi-byte characters
split across tokens, and stop strings that span token boundaries."""

from __future__ import annotations

import importlib.util
import random

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


def stream(
    tok: Tokenizer, ids: list[int], stop: list[str] = (), prompt: list[int] = ()
) -> tuple[list[str], bool, Detokenizer]:
    d = Detokenizer(tok, list(stop), prompt)
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


# -- incremental decoding: exactly what decoding all the ids at once gives ----------------------------------
class FullDecode:
    """The detokenizer as first written, the reference for the incremental one: each token decodes the
    prompt's tail and all output ids again."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.prefix = list(prompt_ids[-4:])
        self.prefix_text = tokenizer.decode(self.prefix)
        if self.prefix_text.endswith("\ufffd"):
            self.prefix, self.prefix_text = [], ""
        self.ids: list[int] = []
        self.text, self.emitted = "", 0

    def add(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self._decode().rstrip("\ufffd")
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        self.text = text
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = text[self.emitted : end] if end > self.emitted else ""
            self.text, self.emitted = text[:end], max(end, self.emitted)
            return delta, True
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = len(text) - held
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(end, self.emitted)
        return delta, False

    def _decode(self) -> str:
        text = self.tokenizer.decode(self.prefix + self.ids)
        if text.startswith(self.prefix_text):
            return text[len(self.prefix_text) :]
        return self.tokenizer.decode(self.ids)

    def flush(self) -> str:
        text = self._decode() if self.ids else self.text
        delta = text[self.emitted :]
        self.text, self.emitted = text, len(text)
        return delta


def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-style word pieces: the decoder drops the first token's leading space."""
    pieces = ["<unk>", "<s>", "▁", "▁The", "▁capital", "▁is", "▁Paris", ".", "a", "▁b", "é", "▁世界"]
    tok = tokenizers.Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.add_special_tokens(["<s>"])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return Tokenizer(tok, {})


def byte_fallback_tokenizer(strip: bool) -> Tokenizer:
    """Llama-style SentencePiece BPE with byte fallback (as perfxllm builds it from a GGUF file): bytes the
    pieces do not cover are <0xXX> tokens, decoded together, and a run of them that is not valid UTF-8
    becomes one U+FFFD per byte."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += ["▁", "▁The", "▁Paris", ".", "a", "▁END", "E", "ND", "▁世", "界", "é"]
    tok = tokenizers.Tokenizer(
        models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True)
    )
    tok.add_special_tokens(["<s>", "</s>"])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if strip else steps)
    return Tokenizer(tok, {})


def random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """n ids: any token of the vocabulary (special ones too), pieces of multi-byte text, and the single
    bytes of multi-byte characters, where the tokenizer has tokens for them."""
    table = bytes_to_unicode()
    singles = [tok.tok.token_to_id(table[b]) for b in "世界🙂é".encode()]
    singles += [tok.tok.token_to_id(f"<0x{b:02X}>") for b in "世界🙂é".encode()]
    singles = [i for i in singles if i is not None]
    texts = [" héllo", " 世界", "🙂", " END", "naïve café", "\n"]
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.4:
            ids.append(rng.randrange(tok.vocab_size))
        elif kind < 0.7 and singles:
            ids.append(rng.choice(singles))
        else:
            ids += tok.encode(rng.choice(texts), add_bos=False)
    return ids[:n]


@pytest.fixture(
    scope="module", params=["trained", "default", "metaspace", "byte-fallback", "byte-fallback-strip"]
)
def any_tok(request, tok) -> Tokenizer:
    if request.param == "default":
        return request.getfixturevalue("default_tok")
    return {
        "trained": lambda: tok,
        "metaspace": metaspace_tokenizer,
        "byte-fallback": lambda: byte_fallback_tokenizer(strip=False),
        "byte-fallback-strip": lambda: byte_fallback_tokenizer(strip=True),
    }[request.param]()


def test_incremental_detokenizer_releases_what_decoding_everything_releases(any_tok):
    """Token by token, the same deltas, stop hits, text and flushed rest as decoding all ids every time."""
    rng = random.Random(0)
    for trial in range(60):
        ids = random_ids(any_tok, rng, rng.choice([10, 50, 200]))
        prompt = random_ids(any_tok, rng, rng.choice([0, 1, 6]))
        full = any_tok.decode(ids)
        stop = []
        if trial % 2 and len(full) > 4:
            start = rng.randrange(len(full) - 3)
            stop = [full[start : start + rng.randint(1, 3)], "never there"]
        got, want = Detokenizer(any_tok, stop, prompt), FullDecode(any_tok, stop, prompt)
        for i, token in enumerate(ids):
            step = got.add(token)
            assert step == want.add(token), (trial, i)
            assert got.text == want.text, (trial, i)
            if step[1]:
                break
        else:
            assert got.flush() == want.flush(), trial
            assert got.text == want.text


def test_long_generation_streams_exactly_the_text_of_all_ids(default_tok):
    """The default model's tokenizer over 3000 random tokens, multi-byte characters split across many of
    them: the streamed text is what decoding the prompt's tail and all ids at once gives, and a stop string
    far into it cuts the stream exactly before it."""
    rng = random.Random(1)
    prompt = default_tok.encode("Write a long story:", add_bos=False)
    ids = random_ids(default_tok, rng, 3000)
    prefix_text = default_tok.decode(prompt[-4:])
    full = default_tok.decode(prompt[-4:] + ids)
    assert full.startswith(prefix_text)
    full = full[len(prefix_text) :]
    assert sum(full.count(c) for c in "世界🙂") > 50

    deltas, hit, d = stream(default_tok, ids, prompt=prompt)
    assert not hit and "".join(deltas) + d.flush() == full

    stop = next(full[i : i + 3] for i in range(len(full) * 4 // 5, len(full)) if "世" in full[i : i + 3])
    deltas, hit, _ = stream(default_tok, ids, [stop, "not in it"], prompt)
    assert hit and "".join(deltas) == full[: full.index(stop)]
