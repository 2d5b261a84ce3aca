"""Calibration and evaluation text, and calibration samples cut from it.

The default text is the Python standard library's own documentation (`pydoc_data.topics`), so nothing is
downloaded: its topics in sorted order, the first 80% of the characters to calibrate on and the last 20%
held out for perplexity. It varies a little between Python versions; results record the version."""

from __future__ import annotations

from pathlib import Path

from perfxllm.errors import PerfxError
from perfxllm.model.tokenizer import Tokenizer

CALIBRATION_FRACTION = 0.8


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def default_calibration_text() -> str:
    text = pydoc_text()
    return text[: int(len(text) * CALIBRATION_FRACTION)]


def default_eval_text() -> str:
    text = pydoc_text()
    return text[int(len(text) * CALIBRATION_FRACTION) :]


def read_text(path: str | None, default: str) -> str:
    if path is None:
        return default
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerfxError(f"cannot read the text file {path}: {e}") from None


def calibration_samples(tokenizer: Tokenizer, text: str, n_samples: int, seq_len: int) -> list[list[int]]:
    """n_samples windows of seq_len tokens spread evenly over the text (they overlap only if the text is
    shorter than n_samples * seq_len tokens)."""
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) < seq_len:
        raise PerfxError(f"the calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    span = len(ids) - seq_len
    starts = [i * span // max(n_samples - 1, 1) for i in range(n_samples)]
    return [ids[s : s + seq_len] for s in starts]
