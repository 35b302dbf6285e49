"""A test that hangs ends its tier's run after the tier's limit, printing every thread's stack
(tests/run_tiers.py): a hung thread blocks even the event loop's teardown, so only ending the
process is sure to end the run."""

import subprocess
import sys
from pathlib import Path

from run_tiers import TIERS

HANGS = '''
import asyncio, threading
import pytest

@pytest.mark.asyncio
async def test_waits_on_a_thread_that_never_answers():
    await asyncio.to_thread(threading.Event().wait)
'''


def test_every_tier_but_vllm_has_a_limit() -> None:
    assert all(limit > 0 for tier, (_, _, limit) in TIERS.items() if tier != "vllm")


def test_a_hung_asyncio_test_ends_the_run_with_every_threads_stack(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGS)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=2", "--timeout-method=thread",
                           "-o", "asyncio_mode=strict", str(tmp_path / "test_hangs.py")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    printed = done.stdout + done.stderr
    assert done.returncode != 0, printed[-2000:]
    assert "Timeout" in printed and "Stack of" in printed and "threading.py" in printed and "test_hangs.py" in printed
