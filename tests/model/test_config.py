"""ModelConfig.from_hf: every size in range and every field of its type, or one clear line naming the field;
the largest real Llama-family shapes pass."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_models import TINY_CONFIG

from perfxllm.errors import ModelLoadError
from perfxllm.model.config import ModelConfig
from perfxllm.model.random_weights import PRESETS

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads is 0, not an integer from 1 to 1024"),
        ({"vocab_size": 10**12}, "vocab_size is 1000000000000, not an integer from 1 to 4194304"),
        ({"max_position_embeddings": -1}, "max_position_embeddings is -1, not an integer from 1 to 4194304"),
        ({"hidden_size": -64}, "hidden_size is -64, not an integer from 1 to 131072"),
        ({"head_dim": -16}, "head_dim is -16, not an integer from 1 to 1024"),
        ({"head_dim": 15}, "head_dim (15) must be even"),
        ({"num_hidden_layers": 10**8}, "num_hidden_layers is 100000000, not an integer from 1 to 1024"),
        ({"intermediate_size": "128"}, "intermediate_size is '128', not an integer"),
        ({"rope_theta": -1.0}, "rope_theta is -1.0, not a positive number"),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is None, not a positive number"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": 4.0}}, "high_freq_factor (4.0) must be above"),
        ({"rope_scaling": LLAMA3}, "rope_scaling.original_max_position_embeddings is None"),
        ({"rope_scaling": [1]}, "rope_scaling is [1], not an object"),
        ({"architectures": [["LlamaForCausalLM"]]}, "architectures is [['LlamaForCausalLM']], not a list"),
        ({"eos_token_id": "x"}, "eos_token_id is 'x', not a token id or a list of them"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id is [2, 'x'], not a token id"),
        ({"bos_token_id": 1.0}, "bos_token_id is 1.0, not a token id"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', not true or false"),
    ],
)
def test_bad_field(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        ModelConfig.from_hf({**TINY_CONFIG, **fields}, "m/config.json")
    message = str(e.value)
    assert message.startswith("m/config.json") and needle in message and "\n" not in message


def test_largest_real_shapes_pass() -> None:
    llama_405b = {
        "vocab_size": 128256,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8192},
    }
    gradient_4m_context = {**PRESETS["llama3-8b"], "max_position_embeddings": 4194304}
    for fields in (llama_405b, gradient_4m_context, *PRESETS.values()):
        ModelConfig.from_hf(fields)


def test_context_length_is_the_model_s_at_most_8192_unless_asked() -> None:
    config = ModelConfig.from_hf({**TINY_CONFIG, "max_position_embeddings": 32768})
    assert (config.context_length(), config.context_length(10000)) == (8192, 10000)
    assert ModelConfig.from_hf(TINY_CONFIG).context_length(10000) == 4096  # the default context
