"""The architecture hyper-parameters of a Llama-family model, read from a Hugging Face config.json
(GGUF metadata is first translated into the same dictionary by the GGUF loader), checked once here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from perfxllm.errors import ModelLoadError, shown

# The context a model runs with when none is asked for: its own, at most this.
DEFAULT_CONTEXT = 8192

# Inclusive bounds on the sizes, far above every released Llama-family model (Llama 3.1 405B: 126 layers,
# hidden 16384, intermediate 53248, 128 heads; Qwen2: vocabulary 152064; head_dim at most 256; Gradient's
# Llama-3-8B-Instruct-Gradient-4194k: context 4194304 = 2**22), so that a corrupt value fails here rather than
# in an allocation of terabytes or hours of building layers.
SIZE_LIMITS = {
    "vocab_size": 2**22,
    "hidden_size": 2**17,
    "intermediate_size": 2**17,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": 2**22,
}


def checked_size(value: Any, key: str, where: str) -> int:
    """value if it is an integer from 1 to the limit of the size `key` (a config.json field); else a
    ModelLoadError about `where`."""
    limit = SIZE_LIMITS[key]
    if not _is_int(value) or not 1 <= value <= limit:
        raise ModelLoadError(f"{where} is {shown(value)}, not an integer from 1 to {limit}")
    return value


def token_ids(value: Any, where: str) -> list[int]:
    """An id or a list of ids (as config.json and generation_config.json give eos_token_id) as a new list."""
    ids = [] if value is None else list(value) if isinstance(value, list) else [value]
    if not all(map(_is_int, ids)):
        raise ModelLoadError(f"{where} is {shown(value)}, not a token id or a list of them")
    return ids


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def context_length(self, requested: int | None = None) -> int:
        """The positions a run uses: requested (default DEFAULT_CONTEXT), at most the model's context."""
        return min(requested or DEFAULT_CONTEXT, self.max_position_embeddings)

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """d: config.json's fields; where: the file they came from, for errors."""

        def size(key: str, default: int | None = None) -> int:
            value = d.get(key)
            if value is None and default is None:
                raise ModelLoadError(f"{where} lacks the field {key!r}")
            return checked_size(default if value is None else value, key, f"{where}: {key}")

        def flag(key: str, default: bool) -> bool:
            value = d.get(key, default)
            if not isinstance(value, bool):
                raise ModelLoadError(f"{where}: {key} is {shown(value)}, not true or false")
            return value

        architecture = _architecture(d, where)
        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads, head_dim = size("num_key_value_heads", heads), size("head_dim", hidden // heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        if head_dim % 2:
            raise ModelLoadError(f"{where}: head_dim ({head_dim}) must be even: rotary embeddings turn pairs")
        # transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelLoadError(f"{where}: rope_scaling is {shown(rope)}, not an object")
        bos = d.get("bos_token_id")
        if bos is not None and not _is_int(bos):
            raise ModelLoadError(f"{where}: bos_token_id is {shown(bos)}, not a token id")
        return cls(
            architecture=architecture,
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=size("max_position_embeddings", 4096),
            rms_norm_eps=_positive(d.get("rms_norm_eps", 1e-6), f"{where}: rms_norm_eps"),
            rope_theta=_positive(
                d.get("rope_theta") or rope.get("rope_theta") or 10000.0, f"{where}: rope_theta"
            ),
            rope_scaling=_rope_scaling(rope, f"{where}: rope_scaling"),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            # Qwen2 has q/k/v biases without saying so in its config.
            attention_bias=flag("attention_bias", architecture == "Qwen2ForCausalLM"),
            bos_token_id=bos,
            eos_token_ids=token_ids(d.get("eos_token_id"), f"{where}: eos_token_id"),
            hf_config=d,
        )


def _architecture(d: dict[str, Any], where: str) -> str:
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ModelLoadError(f"{where}: architectures is {shown(archs)}, not a list of names")
    return archs[0]


def _positive(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ModelLoadError(f"{where} is {shown(value)}, not a positive number")
    return float(value)


def _rope_scaling(rope: dict[str, Any], where: str) -> dict[str, Any] | None:
    """None for plain RoPE; else rope, with the fields perfxllm.layers.rotary reads checked (a type it does
    not know is refused there)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind in ("linear", "llama3"):
        _positive(rope.get("factor"), f"{where}.factor")
    if kind == "llama3":
        low = _positive(rope.get("low_freq_factor"), f"{where}.low_freq_factor")
        high = _positive(rope.get("high_freq_factor"), f"{where}.high_freq_factor")
        if high <= low:
            raise ModelLoadError(f"{where}: high_freq_factor ({high}) must be above low_freq_factor ({low})")
        context = rope.get("original_max_position_embeddings")
        checked_size(context, "max_position_embeddings", f"{where}.original_max_position_embeddings")
    return rope
