"""Settings for every tier. Torch-free: the operator tier runs where torch is not installed."""

import os
import sys
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many examples the property tests of this run tried (when any ran)."""
    fuzz = sys.modules.get("support.fuzz")
    line = fuzz.summary() if fuzz is not None else None
    if line:
        terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> object:
    """The main thread carries the running test's id, so the stacks a test past its tier's limit
    prints (tests/run_tiers.py) name it even when an asyncio test's own frame is not on them."""
    thread = threading.main_thread()
    name, thread.name = thread.name, f"MainThread running {item.nodeid}"
    try:
        return (yield)
    finally:
        thread.name = name
