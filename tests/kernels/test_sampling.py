"""Sampling: greedy exactness, the truncated distribution against a float64 reference, and draws that
stay inside it with the right frequencies."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.sampling import sample, truncated_probs, truncated_probs_ref

ROWS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.5), (1.0, 1000, 0.95)]


def params(rows, device):
    t = torch.tensor([r[0] for r in rows], device=device)
    k = torch.tensor([r[1] for r in rows], device=device)
    p = torch.tensor([r[2] for r in rows], device=device)
    return t, k, p


def test_truncated_probs_match_reference(device):
    logits = torch.randn(len(ROWS), 50, generator=torch.Generator().manual_seed(0)) * 3
    probs, index = truncated_probs(logits.to(device), *params(ROWS, device))
    full = torch.zeros_like(probs).scatter_(1, index, probs).cpu()
    for i, (temp, k, p) in enumerate(ROWS):
        assert torch.allclose(full[i].double(), truncated_probs_ref(logits[i], temp, k, p), atol=1e-6)


def test_greedy_rows(device):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(device)
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device)
    k = torch.tensor([0, 1, 50, 0], device=device)
    p = torch.tensor([1.0, 1.0, 0.5, 1e-6], device=device)
    assert torch.equal(sample(logits, temp, k, p), logits.argmax(-1))


def test_draw_frequencies(device):
    gen = torch.Generator(device=device).manual_seed(2)
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)).to(device)
    draws = 4000
    rows = logits.expand(draws, -1)
    t, k, p = params([(1.0, 6, 0.9)] * draws, device)
    tokens = sample(rows, t, k, p, generator=gen).cpu()
    expected = truncated_probs_ref(logits[0].cpu(), 1.0, 6, 0.9)
    assert expected[tokens].min() > 0, "drew a token outside the top-k/top-p set"
    freq = torch.bincount(tokens, minlength=12).double() / draws
    assert (freq - expected).abs().max() < 0.04


def test_errors(device):
    logits = torch.randn(2, 10, device=device)
    t, k, p = params([(1.0, 0, 1.0)] * 2, device)
    with pytest.raises(ValueError, match="top_k must have dtype"):
        sample(logits, t, k.float(), p)
    with pytest.raises(ValueError, match="temperature must have shape"):
        sample(logits, t[:1], k, p)
