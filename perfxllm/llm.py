"""The Python API: `LLM(model).generate(prompts, params)`, `LLM.chat(messages, params)`, and their streaming
variants, all in-process on one Engine."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine, RequestOutput
from perfxllm.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    logprobs: list = field(default_factory=list)


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        # Outputs that a step made for a request whose reader is elsewhere (another open stream, or a batch
        # that is waiting on this one): kept until that reader asks.
        self._unread: dict[str, deque[RequestOutput]] = {}

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None) -> list[Completion]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self._run([self.tokenizer.encode(p) for p in prompts], params or SamplingParams())

    def chat(
        self, messages: Messages | list[Messages], params: SamplingParams | None = None
    ) -> list[Completion]:
        """One conversation (a list of {"role", "content"} dicts) or a batch of them."""
        batch = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._run([self.tokenizer.encode_chat(m) for m in batch], params or SamplingParams())

    def generate_stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        return self.stream_ids(self.tokenizer.encode(prompt), params or SamplingParams())

    def chat_stream(
        self, messages: Messages, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        return self.stream_ids(self.tokenizer.encode_chat(messages), params or SamplingParams())

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts the request."""
        request_id = self.engine.add_request(prompt_ids, params)
        queue = self._unread.setdefault(request_id, deque())
        finished = False
        try:
            while not finished:
                if not queue:
                    self._step()
                    continue
                out = queue.popleft()
                finished = out.finished
                yield out
        finally:
            del self._unread[request_id]
            if not finished:
                self.engine.abort(request_id)

    def _step(self) -> None:
        """One engine step, its outputs queued for their requests' readers."""
        for out in self.engine.step():
            queue = self._unread.get(out.request_id)
            if queue is not None:
                queue.append(out)

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        ids = [self.engine.add_request(p, params) for p in prompt_ids]
        results = {i: Completion("", [], None, len(p)) for i, p in zip(ids, prompt_ids)}
        for i in ids:
            self._unread[i] = deque()
        pending = set(ids)
        try:
            while pending:
                self._step()
                for i in list(pending):
                    c, queue = results[i], self._unread[i]
                    while queue:
                        out = queue.popleft()
                        c.text += out.text
                        c.token_ids += out.token_ids
                        c.logprobs += out.logprobs
                        c.finish_reason = out.finish_reason
                        if out.finished:
                            pending.discard(i)
        finally:
            for i in ids:
                del self._unread[i]
            for i in pending:
                self.engine.abort(i)
        return [results[i] for i in ids]
