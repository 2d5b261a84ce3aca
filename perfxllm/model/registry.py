"""Architectures by the name config.json gives them. A new architecture joins here."""

from __future__ import annotations

from torch import nn

from perfxllm.errors import UnsupportedError
from perfxllm.model.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedError(
            f"unsupported architecture {architecture!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None
