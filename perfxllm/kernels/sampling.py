"""Sampling from logits [B, V], one row per sequence: greedy, or temperature then top-k, top-p and min-p.

Plain torch on whatever device the logits are on. A row scales its logits by 1 / temperature (NaN becomes 0 and
+-inf the largest float32), then keeps
  top-k (1 <= k < V): the tokens at least as large as the k-th largest scaled logit,
  top-p (< 1), on the renormalised top-k distribution: the tokens whose more probable tokens hold less than
    top_p of the mass,
  min-p: the tokens with at least min_p times the largest probability,
and renormalises. Every cut keeps all the tokens tied at it, so which tokens survive never depends on the order
a sort or topk puts equal values in.

The settings are Python numbers (SamplingSettings), so the path is chosen on the host and nothing waits for the
device: no row with top-k or top-p, no sort; every such row with top_k <= TOPK_MAX, torch.topk of the largest
top_k; otherwise a full sort of every row.

The draw is the exponential race: argmax(probs / Exp(1) noise) is a draw from probs, as torch.multinomial's is,
without multinomial's check of its input that waits for the device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from perfxllm.kernels._common import check_tensor, to_device

# The largest top_k that takes torch.topk of the batch's largest top_k instead of a full sort of every row. On
# an H200, for 64 rows of 128256: topk(50) 0.14 ms, topk(4096) 0.16 ms, topk(8192) 0.26 ms, the sort 0.61 ms.
TOPK_MAX = 4096


class SamplingSettings:
    """A batch's settings, one per row of logits [rows, vocab]: temperature (<= 0: greedy), top_k (<= 0 or
    >= vocab: off), top_p (>= 1: off) and min_p (0: off). The path is chosen here, from the Python numbers;
    one copy goes to the device. Made outside a CUDA graph, sample() with them can be captured."""

    def __init__(
        self,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        min_p: Sequence[float],
        vocab: int,
        device: torch.device,
    ) -> None:
        lengths = [len(temperature), len(top_k), len(top_p), len(min_p)]
        if len(set(lengths)) != 1:
            raise ValueError(
                f"temperature, top_k, top_p and min_p need one value per row, got lengths {lengths}"
            )
        self.rows, self.vocab = len(temperature), vocab
        self.drawn = [i for i, t in enumerate(temperature) if t > 0]  # the rows that are not greedy
        k = [top_k[i] if 0 < top_k[i] < vocab else 0 for i in self.drawn]
        p, m = [top_p[i] for i in self.drawn], [min_p[i] for i in self.drawn]
        self.width = ranked_width(k, p, vocab)
        self.uses_top_k, self.uses_top_p = any(k), any(q < 1 for q in p)
        self.uses_min_p = any(q > 0 for q in m)
        # per drawn row: temperature, the column of the k-th largest logit, what to add to it (-inf: no top-k),
        # top_p and min_p
        values = [
            [temperature[i] for i in self.drawn],
            [max(q - 1, 0) for q in k],
            [0.0 if q else float("-inf") for q in k],
            p,
            m,
        ]
        self.values = to_device(values, device, torch.float32)[:, :, None]  # [5, len(drawn), 1]
        self.index = (
            None if len(self.drawn) == self.rows else to_device(self.drawn, self.values.device, torch.int64)
        )


def ranked_width(top_k: Sequence[int], top_p: Sequence[float], vocab: int) -> int:
    """How many of each row's largest logits top-k and top-p need in descending order: 0 when no row uses
    them, the largest top_k when every row that does has 1 <= top_k <= TOPK_MAX, else vocab (a full sort)."""
    widths = [k if 0 < k < vocab else vocab for k, p in zip(top_k, top_p) if 0 < k < vocab or p < 1]
    if not widths:
        return 0
    return max(widths) if max(widths) <= TOPK_MAX else vocab


def _check(logits: torch.Tensor, settings: SamplingSettings) -> None:
    check_tensor(
        "logits",
        logits,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        shape=(settings.rows, settings.vocab),
        device=settings.values.device,
    )


def _weights(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """float32 [len(drawn), V], for logits of the drawn rows only: each row proportional to its truncated
    distribution (the draw needs no renormalising)."""
    temperature, kth_column, kth_off, top_p, min_p = settings.values
    big = torch.finfo(torch.float32).max
    # Extreme penalties or temperatures can push logits to +-inf (or NaN), and softmax would then give NaN.
    x = (logits.float() / temperature).nan_to_num_(posinf=big, neginf=-big)
    width = settings.width
    if width:
        ranked, order = x.sort(dim=-1, descending=True) if width == settings.vocab else x.topk(width)
        if settings.uses_top_k:
            x.masked_fill_(x < ranked.gather(1, kth_column.long()) + kth_off, float("-inf"))
    probs = x.softmax(-1)
    cuts = []  # per row, the probability below which a token goes
    if settings.uses_top_p:
        ranked_probs = probs.gather(1, order)
        # The last token kept is the first whose cumulative mass reaches top_p; its ties stay with it. Sums in
        # float64, against the probabilities' own total: in float32 (the softmax's sum on the CPU, a long
        # cumsum) the cut moves by about 1e-5 of the mass.
        mass = ranked_probs.cumsum(-1, dtype=torch.float64)
        total = probs.sum(-1, keepdim=True, dtype=torch.float64)
        last = (mass < top_p * total).sum(-1, keepdim=True).clamp_max(width - 1)
        cuts.append(torch.where(top_p < 1, ranked_probs.gather(1, last), 0.0))
    if settings.uses_min_p:
        cuts.append(min_p * probs.amax(-1, keepdim=True))
    if cuts:
        probs.masked_fill_(probs < functools.reduce(torch.maximum, cuts), 0.0)
    return probs


def truncated_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """float32 [B, V]: the distribution each row draws from. logits float16/bfloat16/float32 [B, V]; no row
    may be greedy."""
    _check(logits, settings)
    if len(settings.drawn) != settings.rows:
        raise ValueError(
            "truncated_probs needs temperature > 0 in every row: a greedy row has no distribution"
        )
    weights = _weights(logits, settings)
    return weights / weights.sum(-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """int64 [B]: one token per row of logits (float16/bfloat16/float32 [B, V]); greedy rows take the argmax.

    Row i's noise comes from generators[i] where that is given, else from generator. A row with its own
    generator draws V values from it each time, whatever path the batch takes, so its tokens do not depend
    on the other rows."""
    _check(logits, settings)
    if generators is not None and len(generators) != settings.rows:
        raise ValueError(f"generators must have one entry per row ({settings.rows}), got {len(generators)}")
    if not settings.drawn:
        return logits.argmax(dim=-1)
    own = [generators[i] for i in settings.drawn] if generators is not None else []
    if settings.index is None:
        return _draw(logits, settings, generator, own)
    tokens = logits.argmax(dim=-1)
    tokens[settings.index] = _draw(logits[settings.index], settings, generator, own)
    return tokens


def _draw(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    own: Sequence[torch.Generator | None],
) -> torch.Tensor:
    weights = _weights(logits, settings)
    noise = torch.empty_like(weights).exponential_(generator=generator)
    for row, gen in enumerate(own):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return weights.div_(noise).argmax(dim=-1)


def truncated_probs_ref(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """One row [V], float64, step by step: the distribution sample() draws from (temperature > 0)."""
    big = torch.finfo(torch.float32).max
    x = (logits.double() / temperature).nan_to_num(posinf=big, neginf=-big)
    if 0 < top_k < x.shape[0]:
        x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if top_p < 1:
        ascending = probs.sort().values
        above = ascending.sum() - ascending.cumsum(0)  # the mass after each position
        # at the last position of each value, the mass of the more probable tokens
        more_probable = above[torch.searchsorted(ascending, probs, right=True) - 1]
        probs = probs.masked_fill(more_probable >= top_p, 0.0)
    probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()
