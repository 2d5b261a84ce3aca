"""Write a model as a GGUF file that llama.cpp runs, so that llama.cpp baselines use the very weights we do:
`perfxllm export-gguf --random-weights llama2-7b -o llama2-7b-q4_0.gguf --type q4_0`.

The inverse of gguf_loader: Hugging Face names to llama.cpp's, Llama's q/k rows back into llama.cpp's rotary
order, projections and embeddings quantized by the gguf package (norms stay float32), the tokenizer stored
as a byte-level BPE vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from perfxllm.errors import PerfxError
from perfxllm.model.gguf_loader import GLOBAL_NAMES, LAYER_NAMES, rope_row_order
from perfxllm.model.loader import Checkpoint

TYPES = {
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def gguf_name(hf_name: str) -> str:
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if hf_name in inverse:
        return inverse[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<module>.<attr>
    module, _, attr = rest.rpartition(".")
    short = {v: k for k, v in LAYER_NAMES.items()}[module]
    return f"blk.{layer}.{short}.{attr}"


def write_gguf(ckpt: Checkpoint, path: str | Path, qtype: str = "q4_0") -> None:
    if qtype not in TYPES:
        raise PerfxError(f"unknown GGUF type {qtype!r} (choose from {', '.join(TYPES)})")
    cfg, arch = ckpt.config, _ARCH.get(ckpt.config.architecture)
    if arch is None:
        raise PerfxError(f"cannot write {cfg.architecture} as GGUF")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(Path(ckpt.path).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    _add_tokenizer(w, ckpt)
    heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    for hf_name, tensor in ckpt.source.iter_tensors():
        if not isinstance(tensor, torch.Tensor):
            raise PerfxError("export-gguf takes dense weights (a quantized checkpoint is already packed)")
        values = tensor.float().cpu().numpy()
        module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]
        if arch == "llama" and module in heads:
            values = values[np.argsort(rope_row_order(heads[module], values.shape[0]))]
        kind = TYPES[qtype] if values.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(np.ascontiguousarray(values), kind)
        w.add_tensor(gguf_name(hf_name), data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    tok = ckpt.tokenizer.tok  # the tokenizers.Tokenizer
    vocab = tok.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PerfxError("the tokenizer's ids are not 0..n-1: it cannot be written as a GGUF vocabulary")
    tokens = sorted(vocab, key=vocab.__getitem__)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    # llama.cpp refuses a BPE vocabulary without merges. This one can never apply (nothing merges into
    # "\u0120b" first), so the file tokenizes exactly as the merge-free byte tokenizer does.
    if not {"\u0120b", "a", "\u0120ba"} <= vocab.keys():
        raise PerfxError("export-gguf writes byte-level vocabularies of random-weight models only")
    w.add_token_merges(["\u0120b a"])
    if ckpt.config.eos_token_ids:  # GGUF has one; config.json may list several (Llama 3)
        w.add_eos_token_id(ckpt.config.eos_token_ids[0])
