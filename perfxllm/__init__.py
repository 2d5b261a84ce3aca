"""perfxllm: a fast LLM inference engine; one engine under the terminal chat, the Python API and the server."""

from perfxllm.llm import LLM, Completion
from perfxllm.sampling_params import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams"]
__version__ = "0.1.0"
