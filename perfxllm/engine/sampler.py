"""Turn logits into next tokens: penalties, then greedy or temperature / top-k / top-p / min-p sampling
(perfxllm.kernels.sampling).

Each request with a seed draws from its own generator, so its tokens do not depend on what else is in the
batch. Logprobs are those of the model's distribution after penalties, before temperature and truncation.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from dataclasses import dataclass

import torch

from perfxllm.engine.sequence import Sequence
from perfxllm.kernels._common import to_device
from perfxllm.kernels.sampling import SamplingSettings, sample


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seeded: dict[str, torch.Generator] = {}

    def generator_for(self, seq: Sequence) -> torch.Generator | None:
        """The request's own generator when it has a seed; None: it draws from the engine's."""
        if seq.params.seed is None:
            return None
        gen = self.seeded.get(seq.request_id)
        if gen is None:
            gen = self.seeded[seq.request_id] = torch.Generator(device=self.device).manual_seed(
                seq.params.seed
            )
        return gen

    def release(self, seq: Sequence) -> None:
        self.seeded.pop(seq.request_id, None)

    @torch.inference_mode()  # penalties edit the logits in place: the model runner's are inference tensors
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledBatch:
        """logits [S, vocab] (any float dtype), one row per sequence. On the GPU this only queues the work:
        the tokens stay on the device for the next step's inputs and copy to the host behind it."""
        if any(s.params.penalized for s in seqs):
            logits = logits.float()  # penalties are float32 arithmetic, in place
            apply_penalties(logits, seqs)
        params = [seq.params for seq in seqs]
        settings = SamplingSettings(
            [0.0 if p.greedy else p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            logits.shape[1],
            logits.device,
        )
        seeded = any(p.seed is not None for p in params)
        generators = [self.generator_for(seq) for seq in seqs] if seeded else None
        tokens = sample(logits, settings, self.generator, generators)
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        found: list[torch.Tensor] = []
        if wanted:
            rows = to_device(wanted, logits.device)
            big = torch.finfo(torch.float32).max  # as sampling does: extreme penalties leave +-inf or NaN
            logprobs = torch.log_softmax(logits[rows].float().nan_to_num_(posinf=big, neginf=-big), dim=-1)
            found.append(logprobs.gather(1, tokens[rows].unsqueeze(1)).squeeze(1))
            top_k = max(seqs[i].params.logprobs for i in wanted)
            if top_k:
                found.extend(logprobs.topk(top_k, dim=-1))
        return SampledBatch(seqs, tokens, wanted, [tokens, *found])


class SampledBatch:
    """One step's draws, made on the device and on their way to the host: `tokens` feeds the next step's
    inputs at once, `samples()` waits for the copies."""

    def __init__(
        self, seqs: list[Sequence], tokens: torch.Tensor, wanted: list[int], found: list[torch.Tensor]
    ) -> None:
        self.seqs, self.tokens, self.wanted = seqs, tokens, wanted
        pin = tokens.device.type == "cuda"
        self._host = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin) for t in found
        ]
        self._ready = None
        if pin:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def samples(self) -> list[Sample]:
        """One Sample per sequence, in order (with logprobs where asked)."""
        if self._ready is not None:
            self._ready.synchronize()
        tokens, *found = (t.tolist() for t in self._host)
        samples = [Sample(t) for t in tokens]
        chosen, top_vals, top_ids = [*found, [], [], []][:3]
        for j, i in enumerate(self.wanted):
            n = self.seqs[i].params.logprobs
            samples[i].logprob = chosen[j]
            if n > 0:
                samples[i].top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n]))
        return samples


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place on logits [len(seqs), vocab], row i for seqs[i]. Repetition penalty (CTRL / transformers) on
    prompt and output tokens; presence and frequency penalties (OpenAI) on output tokens only.

    The sequences that share a setting are done together, with the float32 arithmetic of one row at a time
    (the setting as a Python scalar); nothing waits for the device."""
    groups: dict[tuple[float, float, float], list[int]] = defaultdict(list)
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.penalized:
            groups[p.repetition_penalty, p.presence_penalty, p.frequency_penalty].append(i)
    for (repetition, presence, frequency), rows in groups.items():
        index = to_device(rows, logits.device)
        vals = logits[index]
        if repetition != 1.0:
            seen = _token_counts(vals, [seqs[i].token_ids for i in rows]) > 0
            vals = torch.where(seen, torch.where(vals > 0, vals / repetition, vals * repetition), vals)
        if presence or frequency:
            counts = _token_counts(vals, [seqs[i].output_ids for i in rows])
            vals = vals - (frequency * counts + presence * (counts > 0))  # unseen tokens: minus 0, exactly
        logits[index] = vals


def _token_counts(like: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
    """float32 [len(token_lists), vocab] on like's device: how many times row r's list names each token id."""
    rows, ids = array("q"), array("q")
    for r, tokens in enumerate(token_lists):
        ids.extend(tokens)
        rows.extend(array("q", [r]) * len(tokens))
    counts = torch.zeros(len(token_lists), like.shape[1], device=like.device)
    if ids:
        index = torch.stack(
            [torch.frombuffer(rows, dtype=torch.int64), torch.frombuffer(ids, dtype=torch.int64)]
        )
        row, token = index.to(like.device, non_blocking=True)
        counts.index_put_((row, token), torch.ones(len(ids), device=like.device), accumulate=True)
    return counts
