"""`perfxllm bench e2e --device cpu` as a user runs it (without llama.cpp, which is the optional bench extra)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_writes_the_record(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "perfxllm", "bench", "e2e", "--device", "cpu", "--no-llama-cpp",
         "--repeats", "1", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "e2e-cpu.json").read_text())
    assert record["cpu"] and record["cores"] >= 1 and "commit" in record
    (row,) = record["rows"]
    assert row["engine"] == "perfxllm" and row["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert row["quant"] == "Q4_1" and row["threads"] >= 1
    assert all(row[k] > 0 for k in ("pp128_tok_s", "pp512_tok_s", "tg128_tok_s"))
    assert record["chat"]["ttft_ms"] > 0 and record["chat"]["tok_s"] > 0
    assert (tmp_path / "e2e-cpu.png").stat().st_size > 0


def test_says_how_to_get_llama_cpp(tmp_path, monkeypatch, capsys):
    import builtins

    from perfxllm.cli import main

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    assert main(["bench", "e2e", "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
