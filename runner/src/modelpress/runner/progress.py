"""Progress and results: one event per line on stdout for machines, bars on stderr for people.

The events are the contract's models (`modelpress.contract`), so the operator reads exactly what
is written here. Every line passes through `scrub`, so no credential the job holds can reach a log.
"""

import logging
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any, Callable, TextIO

from modelpress.contract import FailureEvent, MemoryEstimate, ProgressEvent, ResultEvent, StageEvent, Wire
from modelpress.runner.connections import scrub

if TYPE_CHECKING:  # the engine and the sampler import torch; reporting needs only their progress types' fields
    from modelpress.engine.pipeline import LayerProgress
    from modelpress.runner.sampling import Rate

TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message


def from_engine(update: "LayerProgress") -> ProgressEvent:
    """The engine's per-layer progress as the contract's event (the engine knows no wire format)."""
    return ProgressEvent(stage="compress", percent=update.percent, layer=update.layer, layers=update.layers,
                         eta_seconds=update.eta_seconds, resumed_at=update.resumed_at or None)


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

    def emit(self, event: Wire) -> None:
        if self.json_lines:
            self.out.write(scrub(event.to_json(), self.secrets) + "\n")
            self.out.flush()

    def stage(self, stage: str, **fields: Any) -> None:
        self.emit(StageEvent(stage=stage, **fields))

    def progress(self, event: ProgressEvent) -> None:
        stage, now = event.stage, time.monotonic()
        if stage in self._finished:
            return
        if self.bars:
            self._bar(stage, event.percent, f"{event.tokens_per_second:.0f} tokens/s" if event.tokens_per_second else "")
        if event.percent >= 100:
            self._finished.add(stage)
        if stage in self._finished or now - self._last.get(stage, -self.interval) >= self.interval:
            self._last[stage] = now
            self.emit(event)

    def memory(self, estimate: MemoryEstimate) -> None:
        """The preflight's memory estimate: the first progress event, or a line per stage on stderr for people."""
        if self.json_lines:
            self.emit(ProgressEvent(stage="preflight", percent=100.0, memory=estimate))
        else:
            from modelpress.runner.preflight import lines

            print("\n".join(lines(estimate)), file=sys.stderr)

    def engine_progress(self, update: "LayerProgress") -> None:
        """A callback for the engine's `progress`: its per-layer updates as events."""
        self.progress(from_engine(update))

    def byte_counter(self, stage: str, total: int) -> Callable[[int], None]:
        """A callback for transfers: bytes so far -> progress events with percent and ETA."""
        start, done = time.monotonic(), [0]

        def count(n: int) -> None:
            done[0] += n
            elapsed = time.monotonic() - start
            percent = round(100 * done[0] / total, 1) if total else 100.0
            rate = done[0] / elapsed if elapsed > 0 else 0
            eta = round((total - done[0]) / rate) if rate else None
            self.progress(ProgressEvent(stage=stage, bytes=done[0], total_bytes=total, percent=percent, eta_seconds=eta))

        return count

    def token_counter(self, stage: str) -> Callable[["Rate"], None]:
        """A callback for self-generation: tokens so far -> progress events with tokens/s and ETA."""

        def count(rate: "Rate") -> None:
            self.progress(ProgressEvent(stage=stage, percent=round(100 * rate.tokens / rate.total, 1), tokens=rate.tokens,
                                        total_tokens=rate.total, tokens_per_second=round(rate.per_second, 1),
                                        eta_seconds=rate.eta_seconds))

        return count

    def _bar(self, stage: str, percent: float, note: str) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=100, desc=stage, unit="%",  # one bar width, so the stages line up
                                           bar_format="{desc:<10} {bar:40} {n:3.0f}% [{elapsed}<{remaining}{postfix}]")
        if note:
            bar.set_postfix_str(note, refresh=False)
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


# What a termination message keeps when the whole event would pass the limit.
TERMINATION_KEEP = {"event", "status", "reason", "exit_code", "message", "output", "sizes", "metrics", "served"}


def termination_message(event: ResultEvent | FailureEvent) -> str:
    """The last event for the pod's termination message: without the original's answers (vLLM's too when they would
    not fit), within Kubernetes' 4 KiB."""
    for exclude in ({"answers": True}, {"answers": True, "served": {"answers"}}):
        text = event.model_dump_json(by_alias=True, exclude_none=True, exclude=exclude)
        if len(text.encode()) <= TERMINATION_LIMIT:
            return text
    text = event.model_dump_json(by_alias=True, exclude_none=True, include=TERMINATION_KEEP, exclude={"served": {"answers"}})
    excess = len(text.encode()) - TERMINATION_LIMIT
    if excess > 0 and isinstance(event, FailureEvent):  # a shorter message keeps the JSON whole
        message = event.message.encode()
        short = message[: max(0, len(message) - excess - 8)].decode(errors="ignore") + "..."
        text = event.model_copy(update={"message": short}).model_dump_json(by_alias=True, exclude_none=True,
                                                                            include=TERMINATION_KEEP, exclude={"served": {"answers"}})
    # Kubernetes keeps bytes, not characters; a cut JSON is still better than none
    return text.encode()[:TERMINATION_LIMIT].decode(errors="ignore")


def summary(result: ResultEvent | FailureEvent, width: int = 44) -> str:
    """The result for people: sizes, metrics, time, and the answers of both models side by side."""
    from modelpress.engine.checkpoint_writer import human_bytes

    sizes, metrics = result.sizes, result.metrics
    rows = [("output", result.output.uri if result.output else ""), ("recipe", result.recipe.summary if result.recipe else "")]
    if sizes:
        rows += [
            ("size before", human_bytes(sizes.original_bytes)),
            ("size after", human_bytes(sizes.compressed_bytes)),
            ("ratio", f"{sizes.ratio:.2f}x smaller"),
        ]
    if metrics and metrics.perplexity_original is not None:
        rows.append(("perplexity", f"{metrics.perplexity_original:.2f} -> {metrics.perplexity_compressed:.2f} "
                     f"({metrics.perplexity_increase_percent:+.1f}%)"))
    served = result.served
    if served is not None:
        nll = metrics.served_nll if metrics else None
        rows.append(("served by", f"{served.served_by}: " + (f"token NLL {nll.vllm:.4f} vs transformers' {nll.transformers:.4f} "
                                                              f"({100 * nll.relative_difference:+.2f}%)" if nll else served.reason or "")))
    rows.append(("time", f"{(result.durations_s or {}).get('total', 0):.1f} s"))
    key = max(len(k) for k, _ in rows)
    lines = [f"{k:<{key}}  {v}" for k, v in rows]
    if result.answers:
        lines += ["", f"  {'original':<{width}} | compressed"]
        for item in result.answers:
            left = textwrap.wrap(item.original, width) or [""]
            right = textwrap.wrap(item.compressed, width) or [""]
            left += [""] * (len(right) - len(left))
            right += [""] * (len(left) - len(right))
            lines += ["", f"> {item.prompt}"] + [f"  {a:<{width}} | {b}" for a, b in zip(left, right)]
    return "\n".join(lines)

