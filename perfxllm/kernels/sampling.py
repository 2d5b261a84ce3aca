"""Greedy and temperature / top-k / top-p sampling on the GPU from logits [B, V], one row per sequence.

Plain torch on whatever device the logits are on: the work is one sort per row plus elementwise passes,
which torch's segmented sort already does at memory speed; a Triton kernel would not pay here.

    logits       float16/bfloat16/float32 [B, V]
    temperature  float32 [B]   <= 0: greedy (argmax) for that row
    top_k        int32/int64 [B]  <= 0 or >= V: no top-k
    top_p        float32 [B]   1.0: no top-p (applied after top-k, on the renormalized distribution)
returns int64 [B] token ids. Drawing uses the exponential-race trick (argmax of p / Exp(1)), one draw per
row from `generator`, so the batch needs no host sync.
"""

from __future__ import annotations

import torch

from perfxllm.kernels._common import check_tensor


def _check(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    check_tensor("logits", logits, dtypes=(torch.float16, torch.bfloat16, torch.float32), ndim=2)
    b = logits.shape[0]
    check_tensor("temperature", temperature, dtypes=(torch.float32,), shape=(b,), device=logits.device)
    check_tensor("top_k", top_k, dtypes=(torch.int32, torch.int64), shape=(b,), device=logits.device)
    check_tensor("top_p", top_p, dtypes=(torch.float32,), shape=(b,), device=logits.device)


def truncated_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs float32 [B, V] in descending-logit order, the vocabulary index of each column [B, V])."""
    _check(logits, temperature, top_k, top_p)
    vocab = logits.shape[1]
    scaled = logits.float() / temperature.clamp_min(1e-5)[:, None]
    ordered, index = scaled.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k).to(torch.int64)
    rank = torch.arange(vocab, device=logits.device)
    probs = ordered.masked_fill(rank[None, :] >= k[:, None], float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), index


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """See the module docstring."""
    probs, index = truncated_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / race).argmax(dim=-1, keepdim=True)
    drawn = index.gather(1, choice).squeeze(1)
    return torch.where(temperature <= 0, logits.argmax(dim=-1), drawn)


def truncated_probs_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, straightforward float64: the distribution over the vocabulary [V] that sampling draws from."""
    x = logits.double() / max(temperature, 1e-5)
    vocab = x.shape[0]
    if 0 < top_k < vocab:
        x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1.0:
        ordered, index = probs.sort(descending=True)
        keep = torch.zeros(vocab, dtype=torch.bool)
        total = 0.0
        for p, i in zip(ordered.tolist(), index.tolist()):
            keep[i] = True
            total += p
            if total >= top_p:
                break
        probs = probs * keep
    return probs / probs.sum()
