"""The OpenAI-compatible server with the default model on the CPU: one `perfxllm serve` for the module,
driven by the official openai client; greedy and short outputs, to stay fast."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from perfxllm.errors import ModelLoadError
from perfxllm.model.loader import default_model_path, open_checkpoint

API_KEY = "test-key"
MAX_QUEUE = 64
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def model_path() -> str:
    try:
        path = default_model_path()
        open_checkpoint(path)
    except (ModelLoadError, ModuleNotFoundError) as e:
        pytest.skip(f"the default model does not load: {e}")
    return path


@pytest.fixture(scope="module")
def server(spawn_server, model_path):
    return spawn_server(model_path, "--max-queue", str(MAX_QUEUE), api_key=API_KEY).wait_ready()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return open_checkpoint(model_path).tokenizer


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, model_path):
    assert [m.id for m in client.models.list().data] == [Path(model_path).name]
    assert client.models.retrieve(Path(model_path).name).id == Path(model_path).name


def test_completion_streamed_equals_whole(client, model):
    whole = client.completions.create(model=model, prompt="The capital of France is", **GREEDY)
    choice = whole.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    chunks = list(
        client.completions.create(model=model, prompt="The capital of France is", stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_streamed_equals_whole(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_strings(client, model):
    kw = {
        "model": model,
        "prompt": "1, 2, 3, 4,",
        "temperature": 0,
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
    }
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    stopped = client.completions.create(stop=["never-seen-stop", stop], **kw).choices[0]
    assert (stopped.text, stopped.finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_choices_share_the_prompt_blocks(client, model, server):
    prompt = "Here is a list of the planets of the solar system, in order from the sun, with one fact each:"
    single = client.completions.create(model=model, prompt=prompt, **GREEDY)
    hits = server.metric("perfxllm_prefix_cache_hits_total")
    several = client.completions.create(model=model, prompt=prompt, n=3, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert {c.text for c in several.choices} == {single.choices[0].text}
    assert several.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert server.metric("perfxllm_prefix_cache_hits_total") >= hits + 3 * (single.usage.prompt_tokens // 16)

    sampled = client.completions.create(
        model=model, prompt=prompt, n=4, temperature=1.0, seed=3, max_tokens=8
    )
    assert len({c.text for c in sampled.choices}) > 1


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert (
            top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))
        )  # greedy: the top token
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())


def test_seed_reproduces_samples(client, model):
    kw = {"model": model, "prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 16}
    a, b, c = (client.completions.create(seed=s, **kw).choices[0].text for s in (1234, 1234, 4321))
    assert a == b
    assert a != c


def test_usage_counts_the_tokenizers_tokens(client, model, tokenizer):
    prompt = "Hello there, how are you today?"
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tokenizer.encode(prompt)), 5)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=3, temperature=0
    )
    assert chat.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert chat.usage.completion_tokens <= 3


def test_64_concurrent_streams_each_get_their_solo_output(client, model, server):
    prompts = [f"Question {i}: what is {i} plus {2 * i}? Answer:" for i in range(8)]
    solo = {p: client.completions.create(model=model, prompt=p, **GREEDY).choices[0].text for p in prompts}

    async def stream(aclient: AsyncOpenAI, prompt: str) -> str:
        chunks = await aclient.completions.create(model=model, prompt=prompt, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in chunks])

    async def run_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, prompts[i % 8]) for i in range(64)))

    texts = asyncio.run(run_all())
    assert texts == [solo[prompts[i % 8]] for i in range(64)]
    server.wait_idle()


def test_disconnect_mid_stream_frees_the_blocks(server, model):
    server.wait_idle()
    aborted = server.metric("perfxllm_requests_total", 'finish_reason="abort"')
    body = {
        "model": model,
        "prompt": "Tell me a long story.",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with server.stream("/v1/completions", body) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data: "))
        assert server.metric("perfxllm_num_requests_running") == 1
        assert server.metric("perfxllm_kv_cache_usage_ratio") > 0
    server.wait_idle(timeout=10)
    assert server.metric("perfxllm_requests_total", 'finish_reason="abort"') == aborted + 1


def test_disconnect_while_waiting_for_a_whole_completion_frees_the_blocks(server, model):
    server.wait_idle()
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json=body, timeout=2)
    server.wait_idle(timeout=10)


def test_queue_full_answers_429(server, client, model):
    server.wait_idle()
    # 4 prompts x n=16: 64 engine requests fill the queue (--max-queue 64).
    body = {
        "model": model,
        "prompt": ["a", "b", "c", "d"],
        "n": 16,
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with server.stream("/v1/completions", body) as r:
        assert r.status_code == 200
        r = server.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=model, prompt="hi", max_tokens=2)
    server.wait_idle(timeout=20)
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].text is not None


def test_oversized_body_answers_413(server):
    body = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    for content in (body, iter([body[: 2**20], body[2**20 :]])):  # with a Content-Length, and chunked
        r = server.post(
            "/v1/completions", content=content, headers={**server.headers, "Content-Type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
    assert server.healthy()


def _chat(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "hi",', 400, "not valid JSON"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    "string max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "'max_tokens'"),
    "number prompt": ("/v1/completions", {"prompt": 5}, 400, "'prompt'"),
    "string messages": ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'"),
    "missing prompt": ("/v1/completions", {"max_tokens": 5}, 400, "'prompt'"),
    "negative max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "oversized prompt": ("/v1/completions", {"prompt": "hello " * 10000}, 400, "maximum context length"),
    "token outside the vocabulary": ("/v1/completions", {"prompt": [10**9]}, 400, "Token ids"),
    "empty prompt list": ("/v1/completions", {"prompt": []}, 400, "prompt"),
    "unknown model": ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "gpt-4o"),
    "n too large": ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "'n'"),
    "echo": ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    "best_of": ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    "tools": (
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "Tool",
    ),
    "json mode": (
        "/v1/chat/completions",
        _chat(response_format={"type": "json_object"}),
        400,
        "response_format",
    ),
    "image content": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "'text'",
    ),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400, "'messages'"),
    "top_logprobs alone": ("/v1/chat/completions", _chat(top_logprobs=2), 400, "logprobs"),
    "unknown parameter": (
        "/v1/completions",
        {"prompt": "hi", "stop_token_ids": [2]},
        400,
        "Unrecognized request argument supplied: stop_token_ids",
    ),
    "stream_options without stream": (
        "/v1/completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    "too many stop strings": (
        "/v1/completions",
        {"prompt": "hi", "stop": list("abcdefghijklmnopq")},
        400,
        "'stop'",
    ),
    "a stop string too long": ("/v1/completions", {"prompt": "hi", "stop": ["x" * 257]}, 400, "'stop[0]'"),
    "max_tokens past the context": (
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 2**70},
        400,
        "maximum context length",
    ),
    "chat max_tokens past the context": (
        "/v1/chat/completions",
        _chat(max_completion_tokens=10**6),
        400,
        "maximum context length",
    ),
    "function_call": ("/v1/chat/completions", _chat(function_call="auto"), 400, "Function calling"),
    "audio": ("/v1/chat/completions", _chat(modalities=["text", "audio"]), 400, "modality"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_clear_4xx_and_harms_nothing(server, model, case):
    path, body, status, needle = BAD_REQUESTS[case]
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = server.post(path, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"], error
    assert server.healthy()
    good = server.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    )
    assert good.status_code == 200


def test_openais_fields_without_effect_here_are_accepted(client, model):
    """user, store, metadata, service_tier and parallel_tool_calls change nothing on this server, and an
    OpenAI client may send them."""
    done = client.completions.create(model=model, prompt="hi", max_tokens=2, user="u1")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        user="u1",
        store=False,
        metadata={"k": "v"},
        service_tier="auto",
        parallel_tool_calls=False,
    )
    assert done.choices[0].finish_reason and chat.choices[0].finish_reason


def test_api_key_guards_everything_but_health(server, model):
    with pytest.raises(openai.AuthenticationError) as e:
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    r = server.post("/v1/completions", json={"model": model, "prompt": "hi"}, headers={})
    assert r.status_code == 401 and json.loads(r.text)["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_describe_the_engine(server):
    for name in (
        "perfxllm_requests_total",
        "perfxllm_prompt_tokens_total",
        "perfxllm_generation_tokens_total",
        "perfxllm_time_to_first_token_seconds_count",
        "perfxllm_time_per_output_token_seconds_count",
        "perfxllm_prefix_cache_hits_total",
    ):
        assert server.metric(name) > 0, name
    for name in (
        "perfxllm_num_requests_waiting",
        "perfxllm_num_preemptions_total",
        "perfxllm_prefix_cache_hit_rate",
    ):
        assert server.metric(name) >= 0, name


def test_an_idle_connection_outlives_a_clients_pool_expiry(server):
    """httpx (under the openai client) keeps an idle connection for 5 s: one the server closed sooner (uvicorn's
    own default is also 5 s) races the client's next request on it, which then fails with a reset."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        time.sleep(6)
        conn.request("GET", "/health")  # the same socket: http.client opens no other while this one is open
        assert conn.getresponse().status == 200
    finally:
        conn.close()
