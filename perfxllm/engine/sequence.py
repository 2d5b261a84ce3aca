"""One request's state as the scheduler and the engine see it. Plain Python: no tensors."""

from __future__ import annotations

import enum
import itertools
import sys
from dataclasses import dataclass, field

from perfxllm.sampling_params import SamplingParams

_ids = itertools.count()
PENDING_TOKEN = -1  # a token being drawn on the device (Engine.step): its id reaches the host a step later


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    seq_no: int = field(default_factory=lambda: next(_ids))  # arrival order, for FCFS
    # prompt plus max_tokens, within the context: a sequence this long is done, and is not scheduled while
    # its last token is still being drawn
    max_num_tokens: int = sys.maxsize

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]  # a copy: count them with num_output_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens
