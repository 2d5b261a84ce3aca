"""The engine end to end, through `perfxllm.LLM`, on a tiny random Llama saved by transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from perfxllm import LLM, SamplingParams
from perfxllm.engine.kv_cache import bytes_per_block
from perfxllm.errors import RequestError

PROMPTS = [
    "Paris",
    "The quick brown fox jumps over",
    "héllo wörld, 世界 🙂 naïve café",
    "def main():\n    return 42\nQuirky zebras vex jolly wizards; 987 kites hum",  # 49 tokens
]
NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
KV_GB = 256 * 8192 / 2**30  # 256 blocks of the tiny model: plenty, and quick to allocate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and several threads on a busy 2-core machine are 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("engine") / "tiny-llama")


MODE = {"async_scheduling": False}


@pytest.fixture(scope="module", autouse=True, params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every test runs with the step finished before step() returns, and with async scheduling (the GPU's
    default: the previous step's outputs are made while this one runs)."""
    MODE["async_scheduling"] = request.param
    return request.param


def make_llm(path: Path, **options) -> LLM:
    options.setdefault("kv_cache_memory_gb", KV_GB)
    options.setdefault("max_model_len", 256)
    return LLM(str(path), **MODE, **options)


@pytest.fixture(scope="module")
def llm(model_dir, async_scheduling) -> LLM:
    return make_llm(model_dir)


@pytest.fixture(scope="module")
def solo(llm) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, generated alone."""
    return {p: llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS}


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_batch_matches_solo_and_transformers(llm, solo, hf_model):
    batch = llm.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in batch] == [solo[p] for p in PROMPTS]
    assert len({len(llm.tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # ragged lengths

    for p in PROMPTS:
        ids = llm.tokenizer.encode(p)
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out[0, len(ids) :].tolist() == solo[p], p


def test_completion_fields(llm, solo):
    c = llm.generate(PROMPTS[1], GREEDY)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == NEW
    assert c.num_prompt_tokens == len(llm.tokenizer.encode(PROMPTS[1]))
    assert c.text == llm.tokenizer.decode(c.token_ids)


def test_max_tokens_gives_length(llm, solo):
    c = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert c.finish_reason == "length" and c.token_ids == solo[PROMPTS[2]][:3]


def first_new_token_index(tokens: list[int]) -> int:
    """An index i > 0 whose token does not occur before it, so that stopping on it stops exactly at i."""
    return next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids(llm, solo):
    tokens = solo[PROMPTS[1]]
    i = first_new_token_index(tokens)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, stop_token_ids=[tokens[i]])
    c = llm.generate(PROMPTS[1], params)[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == tokens[: i + 1]  # the stop token is the last one returned
    assert c.text == llm.tokenizer.decode(tokens[:i])  # but its text is not part of the output


def test_eos_stops_unless_ignored(model_dir, solo, tmp_path):
    """A copy of the model whose generation_config names a token of the greedy output as EOS."""
    tokens = solo[PROMPTS[1]]
    i = first_new_token_index(tokens)
    folder = tmp_path / "eos-model"
    shutil.copytree(model_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tokens[i]}))
    eos_llm = make_llm(folder)
    assert tokens[i] in eos_llm.tokenizer.eos_token_ids

    c = eos_llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=NEW))[0]
    assert c.finish_reason == "stop" and c.token_ids == tokens[: i + 1]
    assert c.text == eos_llm.tokenizer.decode(tokens[:i])
    c = eos_llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True))[0]
    assert c.finish_reason == "length" and c.token_ids == tokens


def test_stop_string(llm, solo):
    full = llm.generate(PROMPTS[1], GREEDY)[0].text
    stop = full[4:7]
    c = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, stop=stop))[
        0
    ]
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(stop)]
    outs = list(llm.generate_stream(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=NEW, stop=stop)))
    assert "".join(o.text for o in outs) == c.text and outs[-1].finish_reason == "stop"


def test_prompt_too_long(model_dir):
    small = make_llm(model_dir, max_model_len=16)
    ids = small.tokenizer.encode(PROMPTS[3])
    assert len(ids) > 16
    with pytest.raises(RequestError):
        small.generate(PROMPTS[3], GREEDY)
    with pytest.raises(RequestError):
        small.engine.add_request(ids[:16], GREEDY)  # no room for a generated token
    assert not small.engine.has_unfinished()
    # One token short of the context: exactly one token is generated, then the context is full.
    c = small._run([ids[:15]], GREEDY)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 1


def test_bad_requests(llm):
    with pytest.raises(RequestError):
        llm.engine.add_request([], GREEDY)
    with pytest.raises(RequestError):
        llm.engine.add_request([llm.engine.model_config.vocab_size], GREEDY)
    rid = llm.engine.add_request([5, 6], GREEDY, request_id="dup")
    with pytest.raises(RequestError):
        llm.engine.add_request([5, 6], GREEDY, request_id="dup")
    llm.engine.abort(rid)
    assert not llm.engine.has_unfinished()


def test_streaming_concatenates_to_the_full_text(llm, solo):
    for p in (PROMPTS[1], PROMPTS[2]):
        outs = list(llm.generate_stream(p, GREEDY))
        assert [t for o in outs for t in o.token_ids] == solo[p]
        assert "".join(o.text for o in outs) == llm.generate(p, GREEDY)[0].text
        assert [o.finished for o in outs] == [False] * (NEW - 1) + [True]
        assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == NEW


def test_interleaved_streams_and_batches_each_get_all_their_outputs(llm, solo):
    """Steps run for whichever reader asks; outputs of the others' requests wait for them."""
    a = llm.generate_stream(PROMPTS[0], GREEDY)
    b = llm.generate_stream(PROMPTS[1], GREEDY)
    got_a, got_b = [next(a)], [next(b)]
    batch = llm.generate([PROMPTS[2], PROMPTS[3]], GREEDY)  # runs while both streams are open
    got_a += list(a)
    got_b += list(b)
    assert [t for o in got_a for t in o.token_ids] == solo[PROMPTS[0]]
    assert [t for o in got_b for t in o.token_ids] == solo[PROMPTS[1]]
    assert [c.token_ids for c in batch] == [solo[PROMPTS[2]], solo[PROMPTS[3]]]
    assert not llm.engine.has_unfinished() and not llm._unread


def test_closing_a_stream_aborts_and_frees_blocks(llm):
    bm = llm.engine.block_manager
    free_at_start = bm.num_free_blocks
    stream = llm.generate_stream(PROMPTS[3], GREEDY)
    next(stream)
    next(stream)
    assert bm.num_free_blocks < free_at_start and llm.engine.has_unfinished()
    stream.close()
    assert bm.num_free_blocks == free_at_start
    assert not llm.engine.has_unfinished() and not llm.engine.seqs and not llm.engine.detokenizers


def test_abort_a_waiting_request(model_dir, solo):
    one = make_llm(model_dir, max_num_seqs=1)
    e = one.engine
    free_at_start = e.block_manager.num_free_blocks
    first = e.add_request(one.tokenizer.encode(PROMPTS[1]), GREEDY)
    second = e.add_request(one.tokenizer.encode(PROMPTS[2]), GREEDY)
    outs = e.step() or e.step()  # async scheduling: a step's outputs come with the next
    assert [o.request_id for o in outs] == [first]  # second waits: max_num_seqs=1
    e.abort(second)
    e.abort("no-such-request")
    while e.has_unfinished():
        outs += e.step()
    assert {o.request_id for o in outs} == {first}
    assert [t for o in outs for t in o.token_ids] == solo[PROMPTS[1]]
    assert e.block_manager.num_free_blocks == free_at_start


def test_a_failed_step_leaves_the_engine_working(model_dir, solo):
    """A launch that raises (say, out of memory) loses nothing: the next step runs it again."""
    llm = make_llm(model_dir)
    e = llm.engine
    e.add_request(llm.tokenizer.encode(PROMPTS[1]), GREEDY)
    tokens = [t for _ in range(3) for out in e.step() for t in out.token_ids]
    run = e.runner.run

    def fail_once(*args):
        e.runner.run = run
        raise RuntimeError("injected fault")

    e.runner.run = fail_once
    with pytest.raises(RuntimeError, match="injected fault"):
        e.step()
    while e.has_unfinished():
        tokens += [t for out in e.step() for t in out.token_ids]
    assert tokens == solo[PROMPTS[1]]


def test_chunked_prefill(model_dir, llm, solo, async_scheduling):
    chunked = make_llm(model_dir, max_num_batched_tokens=8)
    ids = chunked.tokenizer.encode(PROMPTS[3])
    assert len(ids) >= 40
    expected = llm._run([ids], GREEDY)[0].token_ids

    e = chunked.engine
    e.add_request(ids, GREEDY)
    steps = 0
    while not (got := [t for out in e.step() for t in out.token_ids]):  # chunks of 8 tokens sample nothing
        steps += 1
    assert steps == -(-len(ids) // 8) - 1 + async_scheduling  # async: the first token comes a step later
    while e.has_unfinished():
        got += [t for out in e.step() for t in out.token_ids]
    assert got == expected

    # Several prompts at once, chunked and mixed with decodes.
    batch = chunked.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in batch] == [solo[p] for p in PROMPTS]


PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, blocks of 16, 2 KV heads of 16, float32


def tight_llm(model_dir: Path, num_blocks: int = 7, **options) -> LLM:
    """max_model_len 80 needs 5 blocks of 16; the 4 prompts with 20 new tokens need 2 + 2 + 2 + 5."""
    tight = make_llm(
        model_dir, max_model_len=80, kv_cache_memory_gb=num_blocks * PER_BLOCK / 2**30, **options
    )
    assert bytes_per_block(tight.engine.model_config, 16, torch.float32) == PER_BLOCK
    assert tight.engine.block_manager.num_free_blocks == num_blocks
    return tight


LONG = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def solo_long(llm) -> list[list[int]]:
    return [llm.generate(p, LONG)[0].token_ids for p in PROMPTS]


def test_preemption_keeps_greedy_outputs(model_dir, solo_long):
    tight = tight_llm(model_dir)
    got = tight.generate(PROMPTS, LONG)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in got] == solo_long
    assert all(c.finish_reason == "length" for c in got)
    assert tight.engine.block_manager.num_free_blocks == 7


def test_preemption_with_chunked_prefill(model_dir, solo_long):
    tight = tight_llm(model_dir, max_num_batched_tokens=8)
    got = tight.generate(PROMPTS, LONG)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in got] == solo_long


def test_prefix_caching(model_dir, solo):
    cached = make_llm(model_dir)
    first = list(cached.generate_stream(PROMPTS[3], GREEDY))
    assert first[0].num_cached_tokens == 0
    second = list(cached.generate_stream(PROMPTS[3], GREEDY))
    n = len(cached.tokenizer.encode(PROMPTS[3]))
    assert second[0].num_cached_tokens == n // 16 * 16 > 0
    assert [t for o in second for t in o.token_ids] == solo[PROMPTS[3]]
    assert cached.engine.block_manager.prefix_hits > 0

    off = make_llm(model_dir, enable_prefix_caching=False)
    list(off.generate_stream(PROMPTS[3], GREEDY))
    assert next(off.generate_stream(PROMPTS[3], GREEDY)).num_cached_tokens == 0


def test_prefix_cache_keeps_the_blocks_of_a_finishing_step(model_dir):
    """A request that draws one token, and a conversation sent again with its answer: the blocks filled in
    the step that finished the request are cached too."""
    cached = make_llm(model_dir)
    ids = cached.tokenizer.encode(PROMPTS[3])  # 49 tokens: 3 full blocks
    one = SamplingParams(temperature=0.0, max_tokens=1)
    list(cached.stream_ids(ids, one))
    assert list(cached.stream_ids(ids, one))[-1].num_cached_tokens == 48

    # 20 + 13 tokens, all but the last computed: 2 full blocks
    answer = [
        t
        for o in cached.stream_ids(ids[:20], SamplingParams(temperature=0.0, max_tokens=13))
        for t in o.token_ids
    ]
    assert next(cached.stream_ids(ids[:20] + answer, GREEDY)).num_cached_tokens == 32


@pytest.mark.parametrize("budget", [2048, 8])
def test_prefix_cache_holds_the_whole_prompt(model_dir, llm, budget):
    """A prompt of exactly two blocks: all of it is cached, and its last token is recomputed (into a
    shared block) to get the logits to sample from."""
    ids = llm.tokenizer.encode(PROMPTS[3])[:32]
    expected = llm._run([ids], GREEDY)[0].token_ids
    cached = make_llm(model_dir, max_num_batched_tokens=budget)
    list(cached.stream_ids(ids, GREEDY))
    hits = cached.engine.block_manager.prefix_hits
    outs = list(cached.stream_ids(ids, GREEDY))
    assert outs[0].num_cached_tokens == 32
    assert cached.engine.block_manager.prefix_hits == hits + 2
    assert [t for o in outs for t in o.token_ids] == expected


def test_prefix_cache_after_an_abort_mid_prefill(model_dir, solo):
    """Blocks of a prompt aborted during its chunked prefill were never computed: a later identical prompt
    must not take them as cached."""
    chunked = make_llm(model_dir, max_num_batched_tokens=8)
    ids = chunked.tokenizer.encode(PROMPTS[3])
    rid = chunked.engine.add_request(ids, GREEDY)
    assert chunked.engine.step() == []  # first 8 tokens only
    chunked.engine.abort(rid)
    assert chunked.generate(PROMPTS[3], GREEDY)[0].token_ids == solo[PROMPTS[3]]


def test_identical_prompts_in_one_batch(llm, solo):
    batch = llm.generate([PROMPTS[3]] * 3, GREEDY)
    assert all(c.token_ids == solo[PROMPTS[3]] for c in batch)


def test_repetition_penalty_end_to_end(llm, solo, hf_model):
    """Penalties edit the model runner's logits in place: this must work through the engine, and match
    transformers."""
    ids = llm.tokenizer.encode(PROMPTS[3])
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, repetition_penalty=1.5)
    got = llm.generate(PROMPTS[3], params)[0].token_ids
    assert got != solo[PROMPTS[3]]
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW,
            do_sample=False,
            repetition_penalty=1.5,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert got == out[0, len(ids) :].tolist()


def test_presence_and_frequency_penalties_end_to_end(llm, solo, hf_model):
    ids = llm.tokenizer.encode(PROMPTS[3])
    params = SamplingParams(
        temperature=0.0, max_tokens=NEW, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5
    )
    got = llm.generate(PROMPTS[3], params)[0].token_ids
    assert got != solo[PROMPTS[3]]
    expected: list[int] = []
    for _ in range(NEW):  # the OpenAI formula over the generated tokens, on transformers' logits
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + expected])).logits[0, -1]
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=logits.shape[0])
        logits = logits - 0.5 * counts - 1.0 * (counts > 0)
        expected.append(int(logits.argmax()))
    assert got == expected


def test_seeded_sampling_end_to_end(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=42, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].token_ids
    batch = llm.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
        SamplingParams(temperature=1.0, max_tokens=8, seed=42, ignore_eos=True),
    )
    assert batch[1].token_ids == alone
    other = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=8, seed=43, ignore_eos=True))
    assert other[0].token_ids != alone


def test_logprobs_end_to_end(llm, solo):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    c = llm.generate(PROMPTS[0], params)[0]
    assert len(c.logprobs) == 4
    for token, s in zip(c.token_ids, c.logprobs):
        assert s.token_id == token and s.logprob <= 0
        assert s.top_logprobs[0] == (token, pytest.approx(s.logprob))
