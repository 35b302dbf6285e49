"""Settings for every tier. Torch-free: the operator tier runs where torch is not installed."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many examples the property tests of this run tried (when any ran)."""
    fuzz = sys.modules.get("support.fuzz")
    line = fuzz.summary() if fuzz is not None else None
    if line:
        terminalreporter.write_line(line)
