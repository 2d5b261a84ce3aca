"""Random-weight models of real shapes, for speed work without multi-GB downloads, with a byte-level
tokenizer. Seeded: models under a billion parameters are drawn on the CPU, so that every device gets the same
weights (the CPU-vs-GPU checks compare them); larger ones are drawn on the device they run on, which takes
seconds instead of minutes, and so differ between devices."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from perfxllm.errors import ModelLoadError
from perfxllm.model.config import ModelConfig
from perfxllm.model.hf_loader import read_json

DEVICE_DRAW_MIN_PARAMS = 1e9
_LLAMA = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    },
    "llama3-8b": {
        **_LLAMA,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "qwen2-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        **_LLAMA,
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
}


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """Ids 0..255 are the bytes (GPT-2's byte-to-unicode alphabet), which is all that encoding produces;
    every higher id decodes to a word of its own (" a", " b", ..., " ba", ...), so that a random model's
    output streams as text like a real model's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: c.encode("utf-8"))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for i in range(len(alphabet), vocab_size):
        n, word = i - len(alphabet), ""
        while True:
            n, r = divmod(n, 26)
            word = chr(ord("a") + r) + word
            if n == 0:
                break
        vocab["\u0120" + word] = i  # U+0120 is the byte-level alphabet's space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class RandomCheckpoint:
    def __init__(self, spec: str, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if spec in PRESETS:
            self.config = dict(PRESETS[spec])
        elif Path(spec).is_file():
            self.config = read_json(Path(spec))
        else:
            raise ModelLoadError(f"--random-weights takes a config.json or one of: {', '.join(PRESETS)}")
        self.config.setdefault("eos_token_id", None)
        self.name = f"random-{Path(spec).stem if spec not in PRESETS else spec}"
        cfg = ModelConfig.from_hf(self.config, spec)
        h, per_layer = cfg.hidden_size, 4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size
        num_params = cfg.num_layers * per_layer + 2 * cfg.vocab_size * h
        self.seed = seed
        self.device = torch.device(device if num_params >= DEVICE_DRAW_MIN_PARAMS else "cpu")
        self.tokenizer = byte_tokenizer(cfg.vocab_size)
        self.tokenizer_config: dict[str, Any] = {}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = ModelConfig.from_hf(self.config)
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        h, d = cfg.hidden_size, cfg.head_dim

        def randn(*shape: int, std: float | None = None) -> torch.Tensor:
            # 1/sqrt(fan_in) keeps activations O(1) through the layers, so greedy outputs are not degenerate.
            std = std if std is not None else shape[-1] ** -0.5
            return torch.randn(*shape, generator=g, device=self.device) * std

        yield "model.embed_tokens.weight", randn(cfg.vocab_size, h, std=1.0)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", 1 + randn(h, std=0.1)
            yield p + "post_attention_layernorm.weight", 1 + randn(h, std=0.1)
            shapes = {
                "q_proj": (cfg.num_heads * d, h),
                "k_proj": (cfg.num_kv_heads * d, h),
                "v_proj": (cfg.num_kv_heads * d, h),
                "o_proj": (h, cfg.num_heads * d),
            }
            for name, shape in shapes.items():
                yield p + f"self_attn.{name}.weight", randn(*shape)
                if cfg.attention_bias and name != "o_proj":
                    yield p + f"self_attn.{name}.bias", randn(shape[0])
            for name, shape in {
                "gate_proj": (cfg.intermediate_size, h),
                "up_proj": (cfg.intermediate_size, h),
                "down_proj": (h, cfg.intermediate_size),
            }.items():
                yield p + f"mlp.{name}.weight", randn(*shape)
        yield "model.norm.weight", 1 + randn(h, std=0.1)
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", randn(cfg.vocab_size, h)
