"""--random-weights CONFIG: a config file that is not a JSON object is one clear line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from perfxllm.errors import ModelLoadError
from perfxllm.model.loader import open_checkpoint


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "holds [1, 2], not a JSON object"),
        (b'{"vocab_size": "\xff"}', "is not valid JSON"),
    ],
    ids=["invalid", "an array", "not UTF-8"],
)
def test_config_that_is_not_a_json_object(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as e:
        open_checkpoint(None, random_weights=str(path))
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_config_values_are_checked_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_text(
        '{"vocab_size": 1e12, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
        '"num_attention_heads": 4}'
    )
    with pytest.raises(ModelLoadError, match=r"huge\.json: vocab_size is 1000000000000\.0, not an integer"):
        open_checkpoint(None, random_weights=str(path))
