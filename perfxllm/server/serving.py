"""The two generation endpoints: a validated request -> prompt token ids -> SamplingParams per choice -> the
AsyncEngine -> one JSON response, or server-sent events ending with `data: [DONE]`.

A request for n choices of k prompts is n * k engine requests (choice index = prompt * n + i); the copies
of a prompt share its KV blocks through prefix caching.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from perfxllm.engine.engine import RequestOutput
from perfxllm.engine.sampler import Sample
from perfxllm.errors import RequestError
from perfxllm.model.tokenizer import Tokenizer
from perfxllm.sampling_params import SamplingParams
from perfxllm.server.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestStream
from perfxllm.server.disconnect import EventStream
from perfxllm.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

# choice i of a streamed output, or None when there is nothing to send
Chunk = Callable[[int, RequestOutput], BaseModel | None]


@dataclass
class _Choice:
    text: str = ""
    samples: list[Sample] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0


class OpenAIServing:
    def __init__(
        self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, max_model_len: int, vocab_size: int
    ) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_model_len, self.vocab_size = max_model_len, vocab_size

    # -- /v1/completions ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> Response:
        self._check(req)
        prompts = await self._completion_prompts(req.prompt)
        self._check_room(
            max(map(len, prompts)), req.max_tokens if "max_tokens" in req.model_fields_set else None
        )
        params = [req.sampling_params(req.max_tokens, req.logprobs, i) for _ in prompts for i in range(req.n)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = self._submit(request_id, [p for p in prompts for _ in range(req.n)], params)
        created, num_prompt_tokens = int(time.time()), sum(map(len, prompts))

        def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
            )

        want_logprobs = req.logprobs is not None
        if req.stream:
            offsets = [0] * len(params)

            def chunk(i: int, out: RequestOutput) -> CompletionChoice | None:
                logprobs = self._completion_logprobs(out.logprobs, offsets[i]) if want_logprobs else None
                if logprobs is not None and logprobs.tokens:
                    offsets[i] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                if not (out.text or out.finished or logprobs):
                    return None
                return CompletionChoice(
                    index=i, text=out.text, logprobs=logprobs, finish_reason=out.finish_reason
                )

            return self._event_stream(stream, response([]), [], chunk, req.include_usage, num_prompt_tokens)

        choices = await self._collect(stream, len(params))
        return _json(
            response(
                [
                    CompletionChoice(
                        index=i,
                        text=c.text,
                        logprobs=self._completion_logprobs(c.samples, 0) if want_logprobs else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                _usage(num_prompt_tokens, choices),
            )
        )

    async def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError.invalid("The prompt list is empty.", "prompt")
        if isinstance(prompt[0], int):
            prompts = [prompt]
        elif isinstance(prompt[0], list):
            prompts = prompt
        else:
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(text) for text in prompt])
        return [self._check_prompt(ids, "prompt") for ids in prompts]

    # -- /v1/chat/completions -------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Response:
        self._check(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except RequestError as e:
            raise APIError.invalid(f"{e}.", "messages") from None
        prompt = self._check_prompt(prompt, "messages")
        max_tokens = req.requested_max_tokens
        self._check_room(len(prompt), max_tokens)
        if max_tokens is None:
            max_tokens = self.max_model_len - len(prompt)
        top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [req.sampling_params(max_tokens, top_logprobs, i) for i in range(req.n)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self._submit(request_id, [prompt] * req.n, params)
        created = int(time.time())

        if req.stream:

            def chunk(i: int, out: RequestOutput) -> ChatChunkChoice | None:
                logprobs = self._chat_logprobs(out.logprobs) if req.logprobs else None
                if not (out.text or out.finished or logprobs):
                    return None
                delta = Delta(content=out.text or None)
                return ChatChunkChoice(
                    index=i, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason
                )

            envelope = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[])
            roles = [
                ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(req.n)
            ]
            return self._event_stream(stream, envelope, roles, chunk, req.include_usage, len(prompt))

        choices = await self._collect(stream, req.n)
        return _json(
            ChatCompletionResponse(
                id=request_id,
                created=created,
                model=self.model_name,
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content=c.text),
                        logprobs=self._chat_logprobs(c.samples) if req.logprobs else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                usage=_usage(len(prompt), choices),
            )
        )

    # -- shared -----------------------------------------------------------------------------------------------
    def _check(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        req.check_supported()
        if req.model is not None and req.model != self.model_name:
            raise APIError(
                404,
                f"The model '{req.model}' does not exist: this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    def _check_room(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """As in vLLM and OpenAI, a max_tokens that the context cannot hold after the prompt is an error (one
        left out is cut to the room there is)."""
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, but {prompt_tokens} "
                f"prompt tokens and max_tokens={max_tokens} make {prompt_tokens + max_tokens}: reduce the "
                "prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError.invalid("The prompt is empty.", param)
        if len(ids) >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(ids)} tokens (the prompt must leave room for at least one generated token).",
                param=param,
                code="context_length_exceeded",
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError.invalid(f"Token ids must be in [0, {self.vocab_size}).", param)
        return ids

    def _submit(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> RequestStream:
        try:
            return self.engine.submit(request_id, prompts, params)
        except Exception as e:
            raise engine_error(e) from None

    async def _collect(self, stream: RequestStream, num_choices: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(num_choices)]
        try:
            async for i, out in stream:
                c = choices[i]
                c.text += out.text
                c.samples += out.logprobs
                c.finish_reason, c.num_tokens = out.finish_reason, out.num_output_tokens
        except Exception as e:
            raise engine_error(e) from None
        finally:
            stream.close()
        return choices

    def _event_stream(
        self,
        stream: RequestStream,
        envelope: BaseModel,
        first: list[BaseModel],
        chunk: Chunk,
        include_usage: bool,
        num_prompt_tokens: int,
    ) -> EventStream:
        """envelope: the chunk object with no choices, serialised once; each event puts one choice in it."""
        head, _, tail = envelope.model_dump_json().partition('"choices":[]')

        def event(choice: BaseModel) -> str:
            return _event(f'{head}"choices":[{choice.model_dump_json()}]{tail}')

        async def events() -> AsyncGenerator[str, None]:
            num_tokens = 0
            try:
                for c in first:
                    yield event(c)
                async for i, out in stream:
                    num_tokens += out.num_output_tokens if out.finished else 0
                    c = chunk(i, out)
                    if c is not None:
                        yield event(c)
                if include_usage:
                    usage = Usage(
                        prompt_tokens=num_prompt_tokens,
                        completion_tokens=num_tokens,
                        total_tokens=num_prompt_tokens + num_tokens,
                    )
                    yield _event(envelope.model_copy(update={"usage": usage}).model_dump_json())
            except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI does
                yield _event(json.dumps(engine_error(e).body()))
            yield _event("[DONE]")

        return EventStream(events(), on_close=stream.close)

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, samples: list[Sample], offset: int) -> CompletionLogprobs:
        tokens = [self._token(s.token_id) for s in samples]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[s.logprob for s in samples],
            top_logprobs=[{self._token(t): lp for t, lp in s.top_logprobs or []} for s in samples],
            text_offset=offsets,
        )

    def _chat_logprobs(self, samples: list[Sample]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **top(s.token_id, s.logprob),
                    top_logprobs=[TopLogprob(**top(t, lp)) for t, lp in s.top_logprobs or []],
                )
                for s in samples
            ]
        )


def engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(
            429, f"The server is busy: {e}. Retry later.", type="rate_limit_error", code="queue_full"
        )
    if isinstance(e, EngineStopped):
        return APIError(503, f"Unavailable: {e}.", type="server_error", code="unavailable")
    if isinstance(e, RequestError):
        return APIError.invalid(f"{e}.")
    return APIError(500, f"The request failed: {e}.", type="server_error", code="internal_error")


def _usage(num_prompt_tokens: int, choices: list[_Choice]) -> Usage:
    completion = sum(c.num_tokens for c in choices)
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=completion,
        total_tokens=num_prompt_tokens + completion,
    )


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _event(data: str) -> str:
    return f"data: {data}\n\n"
