"""Sampler and SamplingParams: every option changes what is drawn, in the documented way."""

from __future__ import annotations

import math

import pytest
import torch

from perfxllm.engine.sampler import Sampler, apply_penalties
from perfxllm.engine.sequence import Sequence
from perfxllm.errors import RequestError
from perfxllm.kernels.sampling import SamplingSettings, truncated_probs
from perfxllm.sampling_params import SamplingParams

N = 2000  # draws for empirical distributions
PROBS = [0.5, 0.3, 0.15, 0.05]


def sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.device("cpu"), seed)


def seq(prompt: list[int] | None = None, output: list[int] = (), rid: str = "r", **params) -> Sequence:
    prompt = [0] if prompt is None else prompt
    return Sequence(rid, [*prompt, *output], SamplingParams(**params), num_prompt_tokens=len(prompt))


def draws(logits: list[float], n: int = N, seed: int = 0, **params) -> torch.Tensor:
    """n independent draws from one row of logits: the row repeated over n sequences of one batch."""
    seqs = [seq(rid=f"r{i}", **params) for i in range(n)]
    samples = sampler(seed)(torch.tensor([logits] * n), seqs).samples()
    return torch.tensor([s.token_id for s in samples])


def freq(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


LOGP = [math.log(p) for p in PROBS]


def probs_of(logits: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution one row of logits is drawn from at temperature 1."""
    settings = SamplingSettings([1.0], [top_k], [top_p], [min_p], len(logits), torch.device("cpu"))
    return truncated_probs(torch.tensor([logits]), settings)[0]


# -- greedy and temperature -----------------------------------------------------------------------------
def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g)
    seqs = [seq(rid=f"r{i}", temperature=0.0, top_k=3, top_p=0.5) for i in range(5)]
    samples = sampler()(logits.clone(), seqs).samples()
    assert [s.token_id for s in samples] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalised", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_give_the_float32_tokens_logprobs_and_penalties(dtype, penalised):
    """The GPU's logits stay in the model's dtype: greedy rows take their argmax as they are, penalties and
    logprobs work on a float32 copy, so every result equals the float32 logits' (and the input is left
    alone)."""
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(6, 300, generator=g)).to(dtype)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins, as in float32
    before = logits.clone()

    def seqs():
        plain = [seq([5], [11, 11], rid="p", temperature=0.0), seq([2], [4], rid="q", temperature=0.0)]
        penalties = [
            seq([5], [11, 11], rid="p", temperature=0.0, frequency_penalty=0.7, repetition_penalty=1.3),
            seq([2], [4], rid="q", temperature=0.0, presence_penalty=1.5),
        ]
        return [
            seq(rid="greedy", temperature=0.0),
            seq(rid="logprobs", temperature=0.0, logprobs=3),
            seq(rid="seeded", temperature=0.8, top_k=20, seed=3),
            seq(rid="greedy2", temperature=0.0),
            *(penalties if penalised else plain),
        ]

    got = sampler()(logits, seqs()).samples()
    want = sampler()(logits.float(), seqs()).samples()
    assert torch.equal(logits, before)
    assert [s.token_id for s in got] == [s.token_id for s in want]
    assert got[0].token_id == 7
    assert got[1].logprob == want[1].logprob and got[1].top_logprobs == want[1].top_logprobs


def test_default_temperature_samples():
    tokens = draws(LOGP)
    assert len(set(tokens.tolist())) == 4  # not greedy
    assert torch.allclose(freq(tokens, 4), torch.tensor(PROBS), atol=0.04)


def test_temperature_sharpens_and_flattens():
    logits = [2.0, 1.0, 0.0, -1.0]
    for t in (0.3, 1.0, 3.0):
        expected = torch.softmax(torch.tensor(logits) / t, -1)
        got = freq(draws(logits, temperature=t), 4)
        assert torch.allclose(got, expected, atol=0.04), (t, got, expected)
    low = freq(draws(logits, temperature=0.3), 4)[0]
    high = freq(draws(logits, temperature=3.0), 4)[0]
    assert low > 0.9 and high < 0.45


# -- truncation -----------------------------------------------------------------------------------------
def test_top_k_never_samples_outside_the_top_k():
    logits = [0.1, 1.0, 0.0, 0.9, 0.2, -0.1]  # nearly flat: without top_k every token shows up
    tokens = set(draws(logits, top_k=2).tolist())
    assert tokens == {1, 3}
    assert len(set(draws(logits).tolist())) == 6


def test_top_k_one_is_greedy():
    assert set(draws([0.0, 0.3, 0.2], n=300, top_k=1).tolist()) == {1}


def test_top_p_keeps_the_nucleus_only():
    tokens = set(draws(LOGP, top_p=0.7).tolist())
    assert tokens == {0, 1}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.49, [0]),  # token 1's preceding mass 0.5 is not < 0.49
        (0.51, [0, 1]),  # 0.5 < 0.51: token 1 stays although 0.5 alone almost reaches top_p
        (0.79, [0, 1]),
        (0.81, [0, 1, 2]),  # preceding mass 0.8 < 0.81
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_boundary(top_p, kept):
    probs = probs_of(LOGP, top_p=top_p)
    assert torch.nonzero(probs).flatten().tolist() == kept
    expected = torch.tensor([PROBS[i] for i in kept])
    assert torch.allclose(probs[kept], expected / expected.sum(), atol=1e-5)
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-5)


def test_top_p_order_does_not_matter():
    shuffled = [LOGP[2], LOGP[0], LOGP[3], LOGP[1]]
    probs = probs_of(shuffled, top_p=0.7)
    assert torch.nonzero(probs).flatten().tolist() == [1, 3]


@pytest.mark.parametrize(("min_p", "kept"), [(0.05, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1])])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, kept):
    probs = probs_of(LOGP, min_p=min_p)
    assert torch.nonzero(probs).flatten().tolist() == kept


def test_min_p_in_sampling():
    assert set(draws(LOGP, min_p=0.2).tolist()) == {0, 1, 2}  # 0.05 < 0.2 * 0.5: token 3 never drawn
    assert 3 in set(draws(LOGP).tolist())


def test_top_k_then_top_p_renormalises():
    probs = probs_of(LOGP, top_k=3, top_p=0.6)
    # top-3 renormalised: 0.5/0.95 = 0.526 < 0.6, so token 1 stays; token 2's preceding 0.842 >= 0.6.
    assert torch.nonzero(probs).flatten().tolist() == [0, 1]


# -- penalties ------------------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, generator=g) * 3
    prompt, output = [3, 7, 7, 12], [12, 20, 5]
    s = seq(prompt, output, repetition_penalty=1.7)
    ours = logits.clone()
    apply_penalties(ours[None], [s])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone()[None])[0]
    assert torch.allclose(ours, ref)
    seen = {3, 7, 12, 20, 5}
    assert any(logits[i] > 0 for i in seen) and any(logits[i] < 0 for i in seen)
    for i in range(30):
        if i in seen:
            assert ours[i] < logits[i] or logits[i] == 0  # positive divided, negative multiplied
        else:
            assert ours[i] == logits[i]


def test_repetition_penalty_changes_what_is_sampled():
    logits = torch.tensor([[2.0, 1.5, 0.0, -3.0]] * 2)
    seqs = [
        seq([0, 3], rid="a", temperature=0.0),
        seq([0, 3], rid="b", temperature=0.0, repetition_penalty=2.0),
    ]
    samples = sampler()(logits, seqs).samples()
    assert [s.token_id for s in samples] == [0, 1]  # 2.0 / 2 = 1.0 < 1.5
    # A token in the prompt loses probability; the negative one goes further down (-3 * 2).
    raw = torch.tensor([2.0, 1.5, 0.0, -3.0])
    penalised = raw.clone()
    apply_penalties(penalised[None], seqs[1:])
    assert penalised.tolist() == [1.0, 1.5, 0.0, -6.0]
    assert torch.softmax(penalised, -1)[0] < torch.softmax(raw, -1)[0]


def test_repetition_penalty_below_one_encourages():
    row = torch.tensor([2.0, -2.0, 1.0])
    apply_penalties(row[None], [seq([0, 1], repetition_penalty=0.5)])
    assert row.tolist() == [4.0, -1.0, 1.0]


def test_presence_and_frequency_penalties_openai_formula_on_output_only():
    logits = torch.zeros(10)
    s = seq([4, 4, 4, 9], [1, 1, 1, 2, 9], presence_penalty=0.25, frequency_penalty=0.5)
    apply_penalties(logits[None], [s])
    expected = torch.zeros(10)
    expected[1] -= 3 * 0.5 + 0.25
    expected[2] -= 1 * 0.5 + 0.25
    expected[9] -= 1 * 0.5 + 0.25  # counted once: the prompt's occurrence does not count
    # Token 4 is only in the prompt: untouched.
    assert torch.allclose(logits, expected)


def test_presence_penalty_alone_and_negative_values():
    logits = torch.zeros(5)
    apply_penalties(logits[None], [seq([0], [3, 3], presence_penalty=-1.0)])
    assert logits.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    logits = torch.zeros(5)
    apply_penalties(logits[None], [seq([0], [3, 3, 2], frequency_penalty=1.0)])
    assert logits.tolist() == [0.0, 0.0, -1.0, -2.0, 0.0]


def test_penalties_change_greedy_choice_and_stay_per_row():
    logits = torch.tensor([[0.0, 5.0, 4.0]] * 3)
    seqs = [
        seq([0], [1, 1], rid="plain", temperature=0.0),
        seq([0], [1, 1], rid="freq", temperature=0.0, frequency_penalty=1.0),
        seq([0], [1], rid="pres", temperature=0.0, presence_penalty=2.0),
    ]
    assert [s.token_id for s in sampler()(logits, seqs).samples()] == [1, 2, 2]


def test_no_output_no_presence_penalty():
    logits = torch.zeros(4)
    apply_penalties(logits[None], [seq([1, 2, 3], presence_penalty=2.0, frequency_penalty=2.0)])
    assert logits.tolist() == [0.0] * 4


def penalise_row_ref(row: torch.Tensor, s: Sequence) -> None:
    """The penalties on one row, the whole vocabulary at a time (as first written)."""
    p = s.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(s.token_ids)))
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and s.output_ids:
        counts = torch.bincount(torch.tensor(s.output_ids), minlength=row.shape[0])
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def test_batched_penalties_equal_one_row_at_a_time_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    settings = [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7, "frequency_penalty": 0.4},
        {"presence_penalty": -0.6, "frequency_penalty": 1.1},
        {"repetition_penalty": 1.3, "presence_penalty": 2.0},
    ]
    seqs = []
    for i in range(40):
        prompt = torch.randint(60, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(60, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist()
        seqs.append(seq(prompt, output, rid=f"r{i}", **settings[i % len(settings)]))
    logits = (torch.randn(60, len(seqs), generator=g) * 4).t()  # not contiguous, as tensor-parallel's are
    logits[0, 3], logits[1, 5] = float("inf"), float("-inf")
    expected = logits.clone()
    for row, s in zip(expected, seqs):
        penalise_row_ref(row, s)
    apply_penalties(logits, seqs)
    assert torch.equal(logits, expected)


# -- seeds ----------------------------------------------------------------------------------------------
FLAT = torch.zeros(1, 50)


def sample_run(s: Sequence, n: int = 20, engine_seed: int = 0, companions: int = 0) -> list[int]:
    """n tokens for s, alone or sampled in a batch next to unseeded and differently seeded sequences."""
    smp = sampler(engine_seed)
    others = [seq(rid=f"o{i}", seed=None if i % 2 else 1000 + i) for i in range(companions)]
    out = []
    for _ in range(n):
        batch = [*others[: companions // 2], s, *others[companions // 2 :]]
        samples = smp(FLAT.repeat(len(batch), 1), batch).samples()
        out.append(samples[batch.index(s)].token_id)
    return out


def test_seed_reproducible_and_distinct():
    a = sample_run(seq(rid="x", seed=7))
    assert a == sample_run(seq(rid="y", seed=7), engine_seed=123)
    assert a != sample_run(seq(rid="x", seed=8))


def test_seed_independent_of_batch_companions():
    alone = sample_run(seq(rid="x", seed=7))
    assert alone == sample_run(seq(rid="x", seed=7), companions=4)


def test_unseeded_requests_share_the_engine_generator():
    assert sample_run(seq(rid="x"), engine_seed=1) == sample_run(seq(rid="y"), engine_seed=1)
    assert sample_run(seq(rid="x"), engine_seed=1) != sample_run(seq(rid="x"), engine_seed=2)


def test_release_forgets_the_seeded_generator():
    smp = sampler()
    s = seq(rid="x", seed=7)
    first = [smp(FLAT.clone(), [s]).samples()[0].token_id for _ in range(5)]
    smp.release(s)
    assert [smp(FLAT.clone(), [s]).samples()[0].token_id for _ in range(5)] == first


# -- logprobs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g) * 2
    seqs = [
        seq(rid="a", temperature=temperature, logprobs=5),
        seq(rid="b", temperature=temperature, logprobs=0),
        seq(rid="c", temperature=temperature),
    ]
    samples = sampler()(logits.clone(), seqs).samples()
    ref = torch.log_softmax(logits, -1)
    a, b, c = samples
    assert a.logprob == pytest.approx(float(ref[0, a.token_id]), abs=1e-5)
    assert [t for t, _ in a.top_logprobs] == ref[0].topk(5).indices.tolist()
    values = [v for _, v in a.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(ref[0].topk(5).values.tolist(), abs=1e-5)
    assert b.logprob == pytest.approx(float(ref[1, b.token_id]), abs=1e-5) and b.top_logprobs is None
    assert c.logprob is None and c.top_logprobs is None
    if temperature == 0.0:
        assert a.top_logprobs[0][0] == a.token_id


# -- SamplingParams -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 1.1},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.5},
        {"stop": [""]},
        {"stop": ""},
        {"logprobs": -1},
        {"logprobs": 21},
    ],
)
def test_sampling_params_rejects(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_sampling_params_defaults_and_stop_string():
    p = SamplingParams(stop="END")
    assert p.stop == ["END"]
    assert not p.greedy and SamplingParams(temperature=0).greedy
    SamplingParams(top_p=1.0, min_p=1.0, logprobs=20, presence_penalty=-2, frequency_penalty=2)


def test_tiny_temperature_is_greedy_not_a_crash():
    """logits / 1e-40 overflows to inf and multinomial would raise, failing the whole batch."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for t in (1e-40, 1e-8):
        assert sampler()(logits.clone(), [seq(temperature=t)]).samples()[0].token_id == 1


@pytest.mark.parametrize("penalty", [1e-300, 1e300, float("inf")])
def test_extreme_repetition_penalty_samples_without_nan(penalty):
    """Penalised logits of +-inf (or NaN: 0 * inf) must not make the whole batch fail."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]] * 2)
    seqs = [seq([0, 1, 2], rid="bad", repetition_penalty=penalty), seq(rid="ok", seed=1)]
    samples = sampler()(logits, seqs).samples()
    assert all(0 <= s.token_id < 4 for s in samples)
    if penalty < 1:
        assert samples[0].token_id == 0  # 2.0 / 1e-300 is the largest by far
    logprobs = sampler()(
        logits[:1], [seq([0, 1, 2], rid="lp", repetition_penalty=penalty, logprobs=2)]
    ).samples()[0]
    assert math.isfinite(logprobs.logprob) and all(math.isfinite(v) for _, v in logprobs.top_logprobs)


def test_seed_range():
    with pytest.raises(RequestError):
        SamplingParams(seed=2**64)
    with pytest.raises(RequestError):
        SamplingParams(seed=-(2**63) - 1)
    for s in (-1, 2**64 - 1):
        assert sampler()(FLAT.clone(), [seq(seed=s)]).samples()[0].token_id in range(50)
