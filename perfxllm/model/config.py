"""The architecture hyper-parameters of a Llama-family model, read from a Hugging Face config.json
(GGUF metadata is first translated into the same dictionary by the GGUF loader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perfxllm.errors import ModelLoadError


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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            # transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_scaling.
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            rope_theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
            return cls(
                architecture=archs[0],
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=rope
                if rope.get("rope_type", rope.get("type", "default")) != "default"
                else None,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 has q/k/v biases without saying so in its config.
                attention_bias=bool(d.get("attention_bias", archs[0] == "Qwen2ForCausalLM")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                hf_config=d,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has a field of the wrong type: {e}") from None
