"""Progress and results: one JSON object per line on stdout for machines, bars on stderr for people.

Every line passes through `scrub`, so no credential the job holds can reach a log.
"""

import json
import logging
import sys
import textwrap
import time
from typing import Any, Callable, TextIO

from modelpress.runner.connections import scrub

TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message


class Reporter:
    """Emits events; throttles progress to one line per stage per `interval` seconds (and the last one)."""

    def __init__(self, json_lines: bool, bars: bool, out: TextIO | None = None, interval: float = 1.0) -> None:
        self.json_lines = json_lines
        self.bars = bars
        self.out = out or sys.stdout
        self.interval = interval
        self.secrets: list[str] = []
        self._last: dict[str, float] = {}
        self._finished: set[str] = set()
        self._bars: dict[str, Any] = {}

    def emit(self, event: dict[str, Any]) -> None:
        if self.json_lines:
            self.out.write(scrub(json.dumps(event), self.secrets) + "\n")
            self.out.flush()

    def stage(self, stage: str, **fields: Any) -> None:
        self.emit({"event": "stage", "stage": stage, **fields})

    def progress(self, event: dict[str, Any]) -> None:
        stage, now = event["stage"], time.monotonic()
        if stage in self._finished:
            return
        if self.bars:
            self._bar(stage, event["percent"])
        if event["percent"] >= 100:
            self._finished.add(stage)
        if stage in self._finished or now - self._last.get(stage, -self.interval) >= self.interval:
            self._last[stage] = now
            self.emit(event)

    def byte_counter(self, stage: str, total: int) -> Callable[[int], None]:
        """A callback for transfers: bytes so far -> progress events with percent and ETA."""
        start, done = time.monotonic(), [0]

        def count(n: int) -> None:
            done[0] += n
            elapsed = time.monotonic() - start
            percent = round(100 * done[0] / total, 1) if total else 100.0
            rate = done[0] / elapsed if elapsed > 0 else 0
            eta = round((total - done[0]) / rate) if rate else None
            self.progress({"event": "progress", "stage": stage, "bytes": done[0], "totalBytes": total, "percent": percent, "eta_s": eta})

        return count

    def _bar(self, stage: str, percent: float) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=100, desc=stage, unit="%", bar_format="{desc:<10} {bar} {n:.0f}% [{elapsed}<{remaining}]")
        bar.update(percent - bar.n)
        if percent >= 100:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


class ScrubFilter(logging.Filter):
    """Removes the reporter's secrets from every log record."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage(), self.reporter.secrets)
        record.args = None
        return True


def termination_message(result: dict[str, Any]) -> str:
    """The result for the pod's termination message: without the answers, within Kubernetes' 4 KiB."""
    compact = {k: v for k, v in result.items() if k != "answers"}
    text = json.dumps(compact, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        keep = ("event", "status", "reason", "exitCode", "message", "output", "sizes", "metrics")
        text = json.dumps({k: compact[k] for k in keep if k in compact}, separators=(",", ":"))
    return text[:TERMINATION_LIMIT]


def summary(result: dict[str, Any], width: int = 44) -> str:
    """The result for people: sizes, metrics, time, and the answers of both models side by side."""
    from modelpress.engine.checkpoint_writer import human_bytes

    sizes, metrics = result.get("sizes", {}), result.get("metrics", {})
    rows = [("output", result.get("output", {}).get("uri", "")), ("recipe", result.get("recipe", {}).get("summary", ""))]
    if sizes:
        rows += [
            ("size before", human_bytes(sizes["originalBytes"])),
            ("size after", human_bytes(sizes["compressedBytes"])),
            ("ratio", f"{sizes['ratio']:.2f}x smaller"),
        ]
    if "perplexityOriginal" in metrics:
        rows.append(("perplexity", f"{metrics['perplexityOriginal']:.2f} -> {metrics['perplexityCompressed']:.2f} "
                     f"({metrics['perplexityIncreasePercent']:+.1f}%)"))
    rows.append(("time", f"{result.get('durationsS', {}).get('total', 0):.1f} s"))
    key = max(len(k) for k, _ in rows)
    lines = [f"{k:<{key}}  {v}" for k, v in rows]
    if result.get("answers"):
        lines += ["", f"  {'original':<{width}} | compressed"]
        for item in result["answers"]:
            left = textwrap.wrap(item["original"], width) or [""]
            right = textwrap.wrap(item["compressed"], width) or [""]
            left += [""] * (len(right) - len(left))
            right += [""] * (len(left) - len(right))
            lines += ["", f"> {item['prompt']}"] + [f"  {a:<{width}} | {b}" for a, b in zip(left, right)]
    return "\n".join(lines)

