"""Tensor parallelism (Megatron-style) over torch.distributed: NCCL between GPUs, gloo between CPU processes.

Each rank holds a slice of every layer: fused q/k/v and gate/up split by output rows (its attention heads,
its share of the MLP), o and down split by input columns and summed with an all-reduce, the embedding and
lm_head split by vocabulary rows (an all-reduce after the lookup, an all-gather of the logits). Packed int4
weights are split along whole groups. Each rank's KV cache holds its own KV heads.

One process per rank. Rank 0 is the engine: it schedules, and broadcasts each step's inputs
(engine.model_runner.StepInputs) to the workers, which run the same forward pass and drop its logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from perfxllm.engine.config import EngineConfig
from perfxllm.errors import PerfxError
from perfxllm.layers.linear import Linear, concat_weights, select_columns, select_rows, split_weight
from perfxllm.model.config import ModelConfig


@dataclass
class TPGroup:
    rank: int
    world_size: int
    group: Any = None  # the process group; None: the default one

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[B, V / world] logits of each rank's rows -> [B, V] on every rank."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def broadcast(self, obj: Any) -> Any:
        """obj from rank 0 to every rank (the others pass None)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class VocabParallelEmbedding(nn.Module):
    """The rows [start, end) of an embedding; ids outside them look up zeros, and the all-reduce fills them in."""

    def __init__(self, weight: torch.Tensor, start: int, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(out * inside.unsqueeze(-1).to(out.dtype))


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    for n, what in [
        (cfg.num_heads, "attention heads"),
        (cfg.num_kv_heads, "KV heads"),
        (cfg.intermediate_size, "intermediate size"),
    ]:
        if n % world_size:
            raise PerfxError(
                f"the model's {what} ({n}) is not divisible by the tensor-parallel size {world_size}"
            )


def _share(n: int, tp: TPGroup) -> slice:
    per = n // tp.world_size
    return slice(tp.rank * per, (tp.rank + 1) * per)


def shard_model(model: nn.Module, tp: TPGroup) -> None:
    """Cut a fully loaded model down to this rank's slice, in place."""
    cfg = model.config
    check_divisible(cfg, tp.world_size)
    heads, kv_heads, inter = (_share(n, tp) for n in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size))
    d = cfg.head_dim
    q_rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(kv_heads.start * d, kv_heads.stop * d)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        q, k, v = split_weight(attn.qkv_proj.weight, sizes)
        attn.qkv_proj.weight = concat_weights(
            [select_rows(q, q_rows), select_rows(k, kv_rows), select_rows(v, kv_rows)]
        )
        if attn.qkv_proj.bias is not None:
            qb, kb, vb = attn.qkv_proj.bias.split(sizes)
            attn.qkv_proj.bias = torch.cat([qb[q_rows], kb[kv_rows], vb[kv_rows]])
        attn.o_proj.weight = select_columns(attn.o_proj.weight, q_rows.start, q_rows.stop)
        attn.o_proj.reduce = tp.all_reduce
        attn.num_heads, attn.num_kv_heads = heads.stop - heads.start, kv_heads.stop - kv_heads.start
        attn.q_size, attn.kv_size = attn.num_heads * d, attn.num_kv_heads * d
        gate, up = split_weight(mlp.gate_up_proj.weight, [cfg.intermediate_size] * 2)
        mlp.gate_up_proj.weight = concat_weights([select_rows(gate, inter), select_rows(up, inter)])
        mlp.down_proj.weight = select_columns(mlp.down_proj.weight, inter.start, inter.stop)
        mlp.down_proj.reduce = tp.all_reduce
    per = -(-cfg.vocab_size // tp.world_size)  # the last rank's rows are padded with zeros
    rows = slice(tp.rank * per, min(cfg.vocab_size, (tp.rank + 1) * per))

    def vocab_rows(w: torch.Tensor) -> torch.Tensor:
        return F.pad(w[rows], (0, 0, 0, per - (rows.stop - rows.start)))

    full_embedding = model.embed_tokens.weight.data
    model.embed_tokens = VocabParallelEmbedding(vocab_rows(full_embedding), rows.start, tp)
    head = full_embedding if cfg.tie_word_embeddings else model.lm_head.weight
    if not isinstance(head, torch.Tensor) and cfg.vocab_size % tp.world_size:
        raise PerfxError(
            f"a packed lm_head of {cfg.vocab_size} rows cannot be split over {tp.world_size} ranks"
        )
    model.lm_head = Linear(cfg.hidden_size, per)  # a fresh module: a tied lm_head holds the embedding
    model.lm_head.weight = vocab_rows(head) if isinstance(head, torch.Tensor) else select_rows(head, rows)
    model.tp = tp
    model.config = dataclasses.replace(
        cfg,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        intermediate_size=inter.stop - inter.start,
        tie_word_embeddings=False,
    )


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def start(config: EngineConfig, device: torch.device) -> tuple[TPGroup, list[mp.Process]]:
    """On rank 0: start the workers of ranks 1..N-1 and join the group with them."""
    world = config.tensor_parallel_size
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise PerfxError(
            f"--tensor-parallel-size {world} needs {world} GPUs; {torch.cuda.device_count()} found"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(rank, config, port), daemon=True) for rank in range(1, world)
    ]
    for w in workers:
        w.start()
    return _join(0, world, port, rank_device(device, 0)), workers


def stop(tp: TPGroup, workers: list[mp.Process]) -> None:
    with contextlib.suppress(RuntimeError):  # a worker that died has already broken the group
        tp.broadcast(None)
    for w in workers:
        w.join(60)
        if w.is_alive():
            w.terminate()
    dist.destroy_process_group()


def _join(rank: int, world: int, port: int, device: torch.device) -> TPGroup:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return TPGroup(rank, world)


def _worker(rank: int, config: EngineConfig, port: int) -> None:
    """Ranks 1..N-1: the same model slice-by-slice and the same steps as rank 0, which samples."""
    from perfxllm.engine.engine import load_checkpoint, make_runner, resolve_device
    from perfxllm.model.loader import build_model, resolve_dtype

    device = rank_device(resolve_device(config.device), rank)
    tp = _join(rank, config.tensor_parallel_size, port, device)
    ckpt = load_checkpoint(config, device)
    max_model_len = ckpt.config.context_length(config.max_model_len)
    model = build_model(ckpt, device, resolve_dtype(config.dtype, device, ckpt.config), tp, max_model_len)
    runner = make_runner(model, config, tp.broadcast(None), max_model_len)
    while (inputs := tp.broadcast(None)) is not None:
        runner.execute(inputs)
    dist.destroy_process_group()
