"""The Llama architecture and its same-shaped relatives (Mistral, Qwen2 with q/k/v bias, SmolLM2,
TinyLlama): pre-norm decoder layers with grouped-query attention, RoPE and a SwiGLU MLP.

q/k/v are one fused projection and gate/up another: the loader concatenates the checkpoint's separate
weights along the output dimension, so each layer runs two matmuls where the checkpoint has five.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from perfxllm.layers.activation import silu_and_mul
from perfxllm.layers.attention import AttentionMetadata, attention
from perfxllm.layers.linear import Linear
from perfxllm.layers.norm import RMSNorm
from perfxllm.layers.rotary import rope_cos_sin_cache
from perfxllm.model.config import ModelConfig

if TYPE_CHECKING:
    from perfxllm.engine.tensor_parallel import TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.scale = self.head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # set by the KV cache
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = attention(
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
            positions,
            cos_sin,
            self.k_cache,
            self.v_cache,
            meta,
            self.scale,
        )
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (fused module name, shard index)
    fused_shards: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        """max_positions: the longest sequence it will run (see ModelConfig.context_length), which sizes
        the rotary table."""
        super().__init__()
        self.config = config
        # on no device and not initialised: the loader gives it its tensor (allocated here it was vocab x hidden
        # floats filled with random numbers and thrown away, 3.1 GB and 3.7 s for Llama 3 8B on a CPU, see
        # ab-cpu-load-memory.json; a random fill even on the meta device imports torch._dynamo, 1.3 s)
        table = torch.empty(config.vocab_size, config.hidden_size, device="meta")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tp: TPGroup | None = None  # set by engine.tensor_parallel.shard_model
        self.register_buffer(
            "cos_sin_cache",
            rope_cos_sin_cache(
                config.head_dim,
                config.context_length(max_positions),
                config.rope_theta,
                config.rope_scaling,
            ),
            persistent=False,
        )

    def shard_sizes(self, fused: str) -> list[int]:
        """The output sizes of the checkpoint projections that the loader stacks into the module `fused`."""
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"qkv_proj": [q_size, kv_size, kv_size], "gate_up_proj": [c.intermediate_size] * 2}[fused]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, vocab] in the model's dtype: greedy decoding takes the argmax of
        those as they are (the float32 copy of a 1000-row batch's fp16 logits took 0.4 ms a step on an H200);
        the sampler widens what it samples from, penalises or reports."""
        logits = self.lm_head(hidden)
        return logits if self.tp is None else self.tp.gather_vocab(logits, self.config.vocab_size)
