"""Rebuild a GGUF file's tokenizer as a Hugging Face `tokenizers.Tokenizer` that gives llama.cpp's token ids.

The reference is llama.cpp's src/llama-vocab.cpp: a "gpt2" vocabulary is byte-level BPE after the regex
splits that its `tokenizer.ggml.pre` names, a "llama" vocabulary is SentencePiece's score-driven bigram merge
with byte fallback. Control, unknown and user-defined tokens are split out of the text before either runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from perfxllm.errors import ModelLoadError, UnsupportedError
from perfxllm.model.gguf_reader import meta_array, meta_value

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values
UNKNOWN, CONTROL, USER_DEFINED, BYTE = 2, 3, 4, 6

# llama.cpp recognises these texts as control tokens whatever type the file gives them: those that end
# generation, and fill-in-the-middle markers, of which pad / repo / file-separator also end generation.
EOG_TEXTS = frozenset(
    [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
        "<|fim_pad|>",
        "<fim-pad>",
        "<fim_pad>",
        "<PAD>",
        "[PAD]",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
    ]
)
_FIM_TEXTS = frozenset(
    [
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ]
)
_CONTROL_TEXTS = EOG_TEXTS | _FIM_TEXTS

# The regex splits of llama.cpp's BPE pre-tokenizer types, applied one after the other. Where llama.cpp swaps
# an HF regex for an std::regex-friendly or hand-written equivalent, the original HF regex is used here.
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_GPT2 = _CONTRACTIONS + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "smollm": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    # llama.cpp matches the CJK class against text whose non-ASCII spaces it has replaced by \v: (?!\s)
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"(?:(?!\s)[一-龥ࠀ-一가-퟿])+", r"\p{N}"],
    "bloom": [r" ?[^(\s|.,!?…。，、।۔،)]+"],
}
# tokenizer.ggml.pre -> (regex family, ignore_merges: a word that is itself a token is not merged further)
_PRE_TYPES: dict[str, tuple[str, bool]] = {
    "default": ("default", False),
    **dict.fromkeys(
        [
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        ("gpt2", False),
    ),
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "glm4",
            "glm5",
        ],
        ("llama3", True),
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe", "chatglm-bpe"], ("llama3", False)),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
        ("smollm", False),
    ),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"],
        ("qwen2", False),
    ),
    "qwen35": ("qwen35", False),
    "falcon": ("falcon", False),
    "deepseek-coder": ("deepseek-coder", False),
    **dict.fromkeys(["bloom", "gpt3-finnish", "poro-chat"], ("bloom", False)),
}
# BPE vocabularies whose pre-tokenizer type makes llama.cpp add BOS when the file does not say
_ADD_BOS_PRE = frozenset(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"]
)


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """meta: the GGUF metadata as plain values (key -> str / number / list)."""
    kind = meta_value(meta, "tokenizer.ggml.model", str)
    tokens: list[str] = meta_array(meta, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = _per_token(meta, "token_type", int, len(tokens), 1)
    if kind == "gpt2":
        merges = meta_array(meta, "tokenizer.ggml.merges", str)
        tok = _byte_level_bpe(tokens, merges, meta_value(meta, "tokenizer.ggml.pre", str))
    elif kind == "llama":
        scores = _per_token(meta, "scores", float, len(tokens), 0.0)
        unk = meta_value(meta, "tokenizer.ggml.unknown_token_id", int)
        add_space_prefix = meta_value(meta, "tokenizer.ggml.add_space_prefix", bool, True)
        tok = _sentencepiece_bpe(tokens, types, scores, unk, add_space_prefix)
    else:
        raise UnsupportedError(f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
    added = [
        (text, types[i] != USER_DEFINED)
        for i, text in enumerate(tokens)
        if text and (types[i] in (UNKNOWN, CONTROL, USER_DEFINED) or text in _CONTROL_TEXTS)
    ]
    # User-defined tokens are split out of the text like special ones, but are not skipped when decoding.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, special in added if special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, special in added if not special])
    return tok


def _per_token(meta: Mapping[str, Any], name: str, kind: type, n_tokens: int, default: Any) -> list[Any]:
    """tokenizer.ggml.<name>: a value of each token (default for each if it is absent)."""
    key = f"tokenizer.ggml.{name}"
    values = meta_array(meta, key, kind) or [default] * n_tokens
    if len(values) != n_tokens:
        raise ModelLoadError(f"{key} has {len(values)} values for {n_tokens} tokens")
    return values


def build_tokenizer_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json's fields, with llama.cpp's defaults; eos_token_ids are all the ids that
    llama.cpp stops generating at (its end-of-generation set). The chat template is passed on unchecked:
    a broken one fails chat prompts, not loading."""
    tokens: list[str] = meta_array(meta, "tokenizer.ggml.tokens", str)

    def token_id(key: str) -> int | None:
        i = meta_value(meta, f"tokenizer.ggml.{key}_token_id", int)
        return i if i is not None and 0 <= i < len(tokens) else None

    def text(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    spm = meta_value(meta, "tokenizer.ggml.model", str) == "llama"
    pre = meta_value(meta, "tokenizer.ggml.pre", str)
    eos_ids = {token_id(k) for k in ("eos", "eot", "eom")} - {None}
    eos_ids |= {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": text("bos"),
        "eos_token": text("eos"),
        "unk_token": text("unknown"),
        "pad_token": text("padding"),
        "add_bos_token": meta_value(meta, "tokenizer.ggml.add_bos_token", bool, spm or pre in _ADD_BOS_PRE),
        "add_eos_token": meta_value(meta, "tokenizer.ggml.add_eos_token", bool, False),
        "eos_token_ids": sorted(eos_ids),
    }


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        # llama.cpp splits a merge at the first space after its first character.
        cut = m.find(" ", 1)
        left, right = m[:cut], m[cut + 1 :]
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    family, ignore_merges = _PRE_TYPES.get(pre or "default", ("", False))
    if not family:
        log.warning("unknown GGUF pre-tokenizer %r: splitting text with GPT-2's regex instead", pre)
        family = "gpt2"
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[family]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: list[str], types: list[int], scores: list[float], unk_id: int | None, add_space_prefix: bool
) -> Tokenizer:
    """llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token, again and again;
    BPE with every (left, right) split of every token as a merge, ranked by that token's score, does the same."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, text in enumerate(tokens):
        if types[i] == BYTE:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(
            vocab,
            [(left, right) for *_, left, right in ranked],
            unk_token=unk,
            byte_fallback=True,
        )
    )
    # llama.cpp prefixes a space to the text before the first token and after each special token: a Prepend
    # normalizer does that, as tokenizers normalizes each stretch of text between added tokens on its own.
    escape = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return tok
