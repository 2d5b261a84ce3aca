"""PerfXChat driven in a real terminal: tmux send-keys to type, capture-pane to read the screen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest
from tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    def __init__(self, command: str) -> None:
        self.name = f"perfxchat-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", command], check=True
        )

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-S", "-200", "-t", self.name], capture_output=True, text=True
        ).stdout

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"timed out; screen:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_chat_turns_reset_interrupt_and_exit(tmp_path):
    model = save_tiny_model(tmp_path / "m", max_position_embeddings=8192)
    cmd = f"{sys.executable} -m perfxllm chat -m {model} --temperature 0 --max-tokens 4000 --ignore-eos"
    term = Terminal(f"{cmd}; echo EXITED-$?; sleep 30")
    try:
        term.wait_for(lambda s: s.count(">>>") == 1)
        term.send("/reset", "Enter")  # nothing to clear yet, but harmless
        term.wait_for(lambda s: "conversation cleared" in s)
        term.send("The quick brown fox", "Enter")
        # Ctrl-C once the answer is streaming stops the answer, not the program.
        term.wait_for(lambda s: len(s.split("The quick brown fox", 1)[-1].strip()) > 20)
        term.send("C-c")
        screen = term.wait_for(lambda s: "tokens/s" in s and s.count(">>>") == 3)
        assert "interrupted" in screen and "Traceback" not in screen

        term.send("/nonsense", "Enter")
        term.wait_for(lambda s: "unknown command" in s)

        term.send("/exit", "Enter")
        screen = term.wait_for(lambda s: "EXITED-" in s)
        assert "EXITED-0" in screen
    finally:
        term.close()
