"""Sampling: each path (no sort, topk, full sort) against the float64 reference, ties included; greedy rows;
draws that stay inside the truncated distribution with the right frequencies; seeded rows whatever the batch."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.sampling import (
    TOPK_MAX,
    SamplingSettings,
    ranked_width,
    sample,
    truncated_probs,
    truncated_probs_ref,
)

VOCAB = TOPK_MAX + 500  # more than TOPK_MAX, so that a top_k can be too large for the topk path

# rows of (temperature, top_k, top_p, min_p), and the number of ranked columns the batch needs
CASES = {
    "temperature": ([(0.7, 0, 1.0, 0.0), (1.3, 0, 1.0, 0.0), (1.0, VOCAB, 1.0, 0.0)], 0),
    "min_p": ([(1.0, 0, 1.0, 0.05), (0.8, 0, 1.0, 0.3), (1.0, 0, 1.0, 0.0)], 0),
    "top_k": ([(1.0, 5, 1.0, 0.0), (0.9, 50, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (1.2, 0, 1.0, 0.0)], 50),
    "top_k_top_p_min_p": (
        [(1.0, 20, 0.5, 0.0), (0.9, 50, 0.9, 0.1), (1.0, 0, 1.0, 0.2), (1.1, TOPK_MAX, 0.95, 0.0)],
        TOPK_MAX,
    ),
    "top_p": ([(1.0, 0, 0.8, 0.0), (1.3, 0, 0.5, 0.05)], VOCAB),
    "mixed": ([(1.0, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.7, 20, 0.6, 0.1), (1.0, 0, 1.0, 0.0)], VOCAB),
    "large_top_k": ([(1.0, TOPK_MAX + 1, 1.0, 0.0), (1.0, 10, 0.9, 0.0)], VOCAB),
}


def settings_of(rows: list[tuple], vocab: int, device: torch.device) -> SamplingSettings:
    return SamplingSettings(*([r[i] for r in rows] for i in range(4)), vocab, device)


def test_ranked_width():
    assert ranked_width([0, 0], [1.0, 1.0], 100) == 0
    assert ranked_width([5, 100], [1.0, 1.0], 100) == 5  # top_k >= vocab is off
    assert ranked_width([5, 0], [0.9, 1.0], 100) == 5
    assert ranked_width([5, 0], [1.0, 0.9], 100) == 100  # top-p without top-k needs every column
    assert ranked_width([TOPK_MAX, 3], [1.0, 1.0], 5000) == TOPK_MAX
    assert ranked_width([TOPK_MAX + 1], [1.0], 5000) == 5000


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("logits_kind", ["random", "bfloat16", "ties"])
def test_paths_match_reference(case, logits_kind, device):
    rows, width = CASES[case]
    settings = settings_of(rows, VOCAB, device)
    assert settings.width == width
    gen = torch.Generator().manual_seed(len(rows))
    if logits_kind == "ties":  # many equal logits: the k-th, top-p and min-p cuts fall inside runs of ties
        logits = torch.randint(-4, 4, (len(rows), VOCAB), generator=gen).float()
    else:
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
    if logits_kind == "bfloat16":
        logits = logits.bfloat16()
    probs = truncated_probs(logits.to(device), settings).cpu().double()
    ref = torch.stack([truncated_probs_ref(row, *r) for row, r in zip(logits, rows)])
    assert torch.equal(probs > 0, ref > 0), "kept a different set of tokens"
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)


def test_ties_at_the_kth_logit_are_kept(device):
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0]] * 2, device=device)
    probs = truncated_probs(logits, settings_of([(1.0, 2, 1.0, 0.0), (1.0, 4, 1.0, 0.0)], 6, device))
    assert (probs[0] > 0).tolist() == [True, False, True, False, True, False]
    assert (probs[1] > 0).tolist() == [True, False, True, True, True, False]


def test_ties_at_the_top_p_cut_are_kept(device):
    logits = torch.tensor([[0.4, 0.3, 0.3]], device=device).log()
    probs = truncated_probs(logits, settings_of([(1.0, 0, 0.5, 0.0)], 3, device))
    torch.testing.assert_close(probs.cpu(), torch.tensor([[0.4, 0.3, 0.3]]))  # not just one of the 0.3s


def test_non_finite_logits(device):
    logits = torch.tensor(
        [[float("inf"), 0.0, float("nan"), float("-inf"), 1.0], [0.0, float("nan"), 1.0, 2.0, 0.5]]
    )
    rows = [(1.0, 0, 1.0, 0.0), (0.5, 3, 0.9, 0.1)]
    probs = truncated_probs(logits.to(device), settings_of(rows, 5, device)).cpu().double()
    ref = torch.stack([truncated_probs_ref(row, *r) for row, r in zip(logits, rows)])
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_greedy_rows(device):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(device)
    rows = [(0.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (0.0, 50, 0.5, 0.1), (-1.0, 0, 1e-6, 0.0)]
    assert torch.equal(sample(logits, settings_of(rows, 300, device)), logits.argmax(-1))
    drawn = sample(logits, settings_of([(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0)] * 2, 300, device))
    assert torch.equal(drawn[::2], logits[::2].argmax(-1))


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"), [(0, 1.0, 0.0), (6, 1.0, 0.05), (6, 0.9, 0.0), (0, 0.8, 0.0)]
)
def test_draw_frequencies(top_k, top_p, min_p, device):
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3))
    draws = 4000
    settings = settings_of([(1.0, top_k, top_p, min_p)] * draws, 12, device)
    gen = torch.Generator(device=device).manual_seed(2)
    tokens = sample(logits.to(device).expand(draws, -1), settings, generator=gen).cpu()
    expected = truncated_probs_ref(logits[0], 1.0, top_k, top_p, min_p)
    assert expected[tokens].min() > 0, "drew a token outside the truncated distribution"
    freq = torch.bincount(tokens, minlength=12).double() / draws
    assert (freq - expected).abs().max() < 0.04


def test_seeded_row_does_not_depend_on_the_batch(device):
    """A row with its own generator draws the same tokens alone, or beside rows that make the batch take
    the topk path or a full sort."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(4)).to(device)

    def tokens(companions: list[tuple]) -> list[int]:
        gen = torch.Generator(device=device).manual_seed(7)
        rows = [(1.0, 0, 1.0, 0.0), *companions]
        settings = settings_of(rows, 50, device)
        batch = logits.expand(len(rows), -1)
        return [int(sample(batch, settings, None, [gen] + [None] * len(companions))[0]) for _ in range(20)]

    alone = tokens([])
    assert len(set(alone)) > 1
    assert tokens([(1.0, 5, 1.0, 0.0)]) == alone
    assert tokens([(1.0, 0, 0.9, 0.0), (0.0, 0, 1.0, 0.0)]) == alone


def test_errors(device):
    logits = torch.randn(2, 10, device=device)
    settings = settings_of([(1.0, 0, 1.0, 0.0)] * 2, 10, device)
    with pytest.raises(ValueError, match="logits must have dtype"):
        sample(logits.int(), settings)
    with pytest.raises(ValueError, match="logits must have shape"):
        sample(logits[:1], settings)
    with pytest.raises(ValueError, match=r"logits must have shape \[2, 10\], got \[2, 9\]"):
        sample(logits[:, :9], settings)
    with pytest.raises(ValueError, match="logits must have shape"):
        truncated_probs(logits[0], settings)
    with pytest.raises(ValueError, match="one value per row"):
        SamplingSettings([1.0, 1.0], [0], [1.0, 1.0], [0.0, 0.0], 10, device)
    with pytest.raises(ValueError, match="generators must have one entry per row"):
        sample(logits, settings, generators=[None])
    with pytest.raises(ValueError, match="temperature > 0"):
        truncated_probs(logits, settings_of([(1.0, 0, 1.0, 0.0), (0.0, 0, 1.0, 0.0)], 10, device))
