"""Run the test tiers and say how long each took.

    python tests/run_tiers.py [--all] [--operator-python PY] [TIER ...]

Each tier is its own pytest run, so a tier cannot lean on what another imported: the operator
tier runs under `--operator-python`, an interpreter without torch, as in the operator image.
The torch tiers run one after another; the operator tier runs beside them (see BESIDE), its output
printed in one block when it ends.
`make test` leaves out the tests marked `exhaustive`; `--all` (`make test-all`) runs them too.
The vllm tier runs only where MODELPRESS_VLLM_PYTHON names vLLM's own interpreter (`make test-vllm`)
and is skipped, saying so, everywhere else.
The last line sums every tier in the form CI reads: `tests: N passed, N failed, N skipped`.
"""

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

TESTS = Path(__file__).resolve().parent

# tier -> (folders, marker expression, seconds one test may take; 0 for no limit): the real-model
# tests of every folder are their own tier. A test past its limit ends its tier's process with the
# stacks of every thread (a hung thread can block even the teardown, so the process is ended, not
# the test), instead of running into CI's limit; the later tiers still run.
TIERS = {
    "operator": (("operator",), "not quality", 120),
    "runner": (("runner",), "not quality", 600),
    "engine": (("engine",), "not quality", 600),
    "e2e": (("e2e",), "not quality", 600),
    "quality": (("engine", "runner", "e2e"), "quality", 900),
    # vLLM in its own venv: skipped, with the reason, unless MODELPRESS_VLLM_PYTHON names its python;
    # a server's start is bounded by the tier's own waits
    "vllm": (("vllm",), "vllm", 0),
}


# Tiers that run beside the others when more than one is asked for: the operator tier has no torch
# and waits on its operators' timers for about half its time, and the runner tier after it in
# TIERS keeps one core of two busy, so on 2 cores the two together take about as long as the runner
# tier alone.
BESIDE = ("operator",)


@dataclass
class Outcome:
    tier: str
    seconds: float
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    exit_code: int = 0


def counts(report: Path) -> tuple[int, int, int]:
    """passed, failed (failures and errors), skipped from a JUnit XML report."""
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - failed - skipped, failed, skipped


def run_tier(tier: str, python: str, everything: bool, extra: list[str], output: TextIO | None = None) -> Outcome:
    """One tier's pytest run, printing to this process's stdout or, where given, to `output`."""
    folders, marker, timeout = TIERS[tier]
    if not everything:
        marker = f"({marker}) and not exhaustive"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        print(f"\n=== tier {tier}: {' '.join(f'tests/{f}' for f in folders)} -m '{marker}' ===", file=output or sys.stdout, flush=True)
        start = time.monotonic()
        done = subprocess.run([python, "-m", "pytest", *(str(TESTS / f) for f in folders), "-m", marker,
                               f"--junitxml={report}", f"--timeout={timeout}", "--timeout-method=thread", "-q", *extra],
                              cwd=TESTS.parent, stdout=output, stderr=subprocess.STDOUT if output else None)
        outcome = Outcome(tier, time.monotonic() - start, exit_code=done.returncode)
        if report.is_file():
            outcome.passed, outcome.failed, outcome.skipped = counts(report)
        elif done.returncode != 0:
            outcome.failed = 1  # ended before its report (a test past the tier's limit): not "0 failed"
    return outcome


def run_tier_buffered(tier: str, python: str, everything: bool, extra: list[str]) -> tuple[Outcome, str]:
    """run_tier with everything it prints kept, for a tier that runs beside others."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        outcome = run_tier(tier, python, everything, extra, log)
        log.seek(0)
        return outcome, log.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiers", nargs="*", metavar="TIER", help=f"any of {', '.join(TIERS)} (default: all, in that order)")
    parser.add_argument("--all", action="store_true", help="also the tests marked exhaustive")
    parser.add_argument("--operator-python", default=sys.executable, help="interpreter for the operator tier (no torch)")
    args, extra = parser.parse_known_args()
    unknown = [t for t in args.tiers if t not in TIERS]
    if unknown:
        parser.error(f"unknown tier(s) {', '.join(unknown)}; choose from {', '.join(TIERS)}")
    tiers = args.tiers or list(TIERS)
    python = {t: args.operator_python if t == "operator" else sys.executable for t in tiers}
    beside = [t for t in tiers if t in BESIDE] if len(tiers) > 1 else []
    by_tier: dict[str, Outcome] = {}
    with ThreadPoolExecutor() as pool:
        running = {t: pool.submit(run_tier_buffered, t, python[t], args.all, extra) for t in beside}
        for t in tiers:
            if t not in beside:
                by_tier[t] = run_tier(t, python[t], args.all, extra)
        for t, future in running.items():
            by_tier[t], printed = future.result()
            print(f"\n(tier {t} ran beside the others; its output:)", printed, sep="", end="", flush=True)
    outcomes = [by_tier[t] for t in tiers]
    print("\n| tier | seconds | passed | failed | skipped |\n|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.tier} | {o.seconds:.0f} | {o.passed} | {o.failed} | {o.skipped} |")
    # exit 5 is pytest's "no tests collected": a tier that runs nothing is a broken tier
    broken = [o.tier for o in outcomes if o.exit_code != 0]
    if broken:
        print(f"tiers that failed: {', '.join(broken)}")
    print(f"tests: {sum(o.passed for o in outcomes)} passed, {sum(o.failed for o in outcomes)} failed, "
          f"{sum(o.skipped for o in outcomes)} skipped")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
