"""Perplexity: the engine's windows against transformers, and the default texts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers

from perfxllm.eval.ppl import perplexity
from perfxllm.model.loader import build_model, open_checkpoint
from perfxllm.quant.calibration import (
    calibration_samples,
    default_calibration_text,
    default_eval_text,
    pydoc_text,
)


def test_perplexity_matches_transformers(tiny_llama):
    ckpt = open_checkpoint(str(tiny_llama))
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, ckpt.config.vocab_size, (3 * 50 + 7,), generator=torch.Generator().manual_seed(0))
    ours = perplexity(model, ids.tolist(), ctx=50, progress=False)
    assert (ours.windows, ours.tokens) == (3, 3 * 49)  # the partial last window is left out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        windows = ids[:150].view(3, 50)
        logits = hf(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(ours.ppl, math.exp(float(nll)), rel_tol=1e-4)
    assert perplexity(model, ids.tolist(), ctx=50, max_windows=1, progress=False).windows == 1


def test_default_texts_split_pydoc_topics():
    text = pydoc_text()
    calib, held_out = default_calibration_text(), default_eval_text()
    assert calib + held_out == text
    assert abs(len(calib) / len(text) - 0.8) < 1e-3


def test_calibration_samples_are_spread_over_the_text(tiny_llama):
    tok = open_checkpoint(str(tiny_llama)).tokenizer
    text = "".join(f"word{i} " for i in range(400))
    samples = calibration_samples(tok, text, n_samples=5, seq_len=16)
    ids = tok.encode(text, add_bos=False)
    assert len(samples) == 5 and all(len(s) == 16 for s in samples)
    assert samples[0] == ids[:16] and samples[-1] == ids[-16:]
