"""tests/run_tiers.py: a test that hangs ends its tier's run after the tier's limit, printing every
thread's stack (a hung thread blocks even the event loop's teardown, so only ending the process is
sure to end the run); the operator tier runs beside the others, its output kept in one block."""

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


WAITS = """
import time
from pathlib import Path

def test_waits_for_the_other_tier():
    deadline = time.monotonic() + 30
    while not Path({flag!r}).exists():
        assert time.monotonic() < deadline, "the other tier never ran meanwhile"
        time.sleep(0.05)
"""

WRITES = """
from pathlib import Path

def test_writes_what_the_operator_tier_waits_for():
    Path({flag!r}).touch()
"""


def test_the_operator_tier_runs_beside_the_others_and_prints_in_one_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The operator tier's one test passes only if the other tier runs while it waits."""
    flag = str(tmp_path / "flag")
    for folder, text in (("waits", WAITS), ("writes", WRITES)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"test_{folder}.py").write_text(text.format(flag=flag))
    monkeypatch.setattr(run_tiers, "TESTS", tmp_path)
    monkeypatch.setattr(run_tiers, "TIERS", {"operator": (("waits",), "not quality", 60), "writes": (("writes",), "not quality", 60)})
    monkeypatch.setattr(sys, "argv", ["run_tiers.py", "--operator-python", sys.executable, "-pno:cacheprovider"])
    assert run_tiers.main() == 0
    printed = capfd.readouterr().out
    block = printed[printed.index("(tier operator ran beside the others; its output:)"):]
    assert "=== tier operator: tests/waits" in block and "1 passed" in block.split("| tier |")[0]
    assert "=== tier operator" not in printed[: printed.index("(tier operator ran beside")]
    assert "tests: 2 passed, 0 failed, 0 skipped" in printed
