"""A test that hangs ends its tier's run after the tier's limit, printing every thread's stack
(tests/run_tiers.py): a hung thread blocks even the event loop's teardown, so only ending the
process is sure to end the run."""

import re
import sys
from pathlib import Path

import pytest

import run_tiers

HANGS = '''
import asyncio, threading
import pytest

@pytest.mark.asyncio
async def test_waits_on_a_thread_that_never_answers():
    await asyncio.to_thread(threading.Event().wait)
'''


def test_every_tier_but_vllm_has_a_limit() -> None:
    assert all(limit > 0 for tier, (_, _, limit) in run_tiers.TIERS.items() if tier != "vllm")


def test_a_hung_asyncio_test_ends_the_run_with_every_threads_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Through run_tier itself, with its own pytest options, on a tier of one hung test."""
    (tmp_path / "hangs").mkdir()
    (tmp_path / "hangs" / "test_hangs.py").write_text(HANGS)
    (tmp_path / "conftest.py").write_text((run_tiers.TESTS / "conftest.py").read_text())  # names the running test
    monkeypatch.setattr(run_tiers, "TESTS", tmp_path)
    monkeypatch.setitem(run_tiers.TIERS, "hangs", (("hangs",), "not quality", 2))
    outcome = run_tiers.run_tier("hangs", sys.executable, False, ["-p", "no:cacheprovider", "-o", "asyncio_mode=strict"])
    printed = "".join(capfd.readouterr())
    assert outcome.exit_code != 0 and outcome.failed == 1 and outcome.passed == 0, printed[-2000:]
    assert "Timeout" in printed and "threading.py" in printed  # the hung thread's stack
    assert re.search(r"Stack of MainThread running \S*hangs/test_hangs\.py::test_waits_on_a_thread_that_never_answers ", printed)
