"""The wire between the runner and the operator: what `modelpress run` writes, the operator reads, field by field.

The runner runs in-process on a tiny model; its stdout lines and termination message go, unchanged,
into the operator's parsers (`operator.status`), as the kubelet would hand them over.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpress.contract import ExitCode, FailureEvent, ProgressEvent, ResultEvent, StageEvent, parse_event
from modelpress.operator.status import failure_message, failure_reason, observe, parse_progress, parse_result, status_patch
from modelpress.runner.cli import main
from support.models import CORPUS
from support.s3 import job_document, trained_llama  # noqa: F401 (fixture)


def run(tmp_path: Path, doc: dict[str, Any]) -> tuple[int, str]:
    """Run a job as the pod would; (exit code, termination message). Its stdout is left to capsys."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term),
                 "--format", "json"])
    return code, term.read_text()


def finished(exit_code: int, message: str, failed: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Job and its pod as the Job controller and the kubelet report them at the end."""
    condition = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "the pod failed",
                 "lastTransitionTime": "2026-01-01T10:05:00Z"} if failed else {"type": "Complete", "status": "True"}
    job = {"spec": {}, "status": {"startTime": "2026-01-01T10:00:00Z", "conditions": [condition]}}
    terminated = {"exitCode": exit_code, "reason": "Error" if failed else "Completed", "message": message}
    pod = {"metadata": {"name": "tiny-runner-x1"}, "status": {"phase": "Failed" if failed else "Succeeded",
                                                              "containerStatuses": [{"name": "runner", "state": {"terminated": terminated}}]}}
    return job, [pod]


def every_line_is_an_event(lines: list[str]) -> list[Any]:
    """Each stdout line parses as a contract event, and reading drops none of its fields."""
    events = [parse_event(line) for line in lines]
    assert all(event is not None for event in events), [line for line, event in zip(lines, events) if event is None]
    for line, event in zip(lines, events):
        assert json.loads(event.to_json()) == json.loads(line)
    return events


def evaluated_job(trained: Path, tmp_path: Path, gate: float, output: str, preset: str = "FP8") -> dict[str, Any]:
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS[:8]))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:8]))
    return job_document(
        str(trained), str(tmp_path / output),
        recipe={"preset": preset, "algorithm": "RTN"},
        calibration={"dataset": str(calib), "numSamples": 4, "maxSequenceLength": 32},
        evaluation={"perplexity": {"dataset": str(text), "maxTokens": 256}, "prompts": ["Paris is"], "maxNewTokens": 3,
                    "maxPerplexityIncrease": gate},
    )


def test_the_operator_reads_every_field_of_a_run_that_succeeds(
        trained_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    code, term = run(tmp_path, evaluated_job(trained_llama, tmp_path, 1000, "out"))
    lines = capsys.readouterr().out.splitlines()
    assert code == ExitCode.OK
    events = every_line_is_an_event(lines)
    assert [e.stage for e in events if isinstance(e, StageEvent)] == ["fetch", "calibrate", "evaluate", "compress", "evaluate", "publish"]

    # Progress: the last progress line wins; the compression's carries layers and the ETA.
    compress_at = max(i for i, e in enumerate(events) if isinstance(e, ProgressEvent) and e.stage == "compress")
    layer = events[compress_at]
    assert layer.layer == layer.layers == 2 and layer.eta_seconds == 0
    progress = parse_progress("\n".join(lines[: compress_at + 1]))
    assert (progress.stage, progress.percent, progress.layers_done, progress.layers_total, progress.estimated_remaining_seconds) == (
        "compress", 100, 2, 2, 0)
    last = [e for e in events if isinstance(e, ProgressEvent)][-1]
    read = parse_progress("\n".join(lines))
    assert (read.stage, read.percent, read.layers_done, read.estimated_remaining_seconds) == (
        last.stage, round(last.percent), last.layer, last.eta_seconds)

    # The result: the last stdout line, and the termination message without the answers.
    result = events[-1]
    assert isinstance(result, ResultEvent) and result.answers[0].prompt == "Paris is"
    assert parse_event(term) == result.model_copy(update={"answers": None})
    status = parse_result(term)
    assert status.uri == result.output.uri == str(tmp_path / "out")
    assert (status.original_size_bytes, status.compressed_size_bytes, status.ratio) == (
        result.sizes.original_bytes, result.sizes.compressed_bytes, result.sizes.ratio)
    assert status.duration_seconds == result.durations_s["total"] > 0
    metrics = {m.name: m.value for m in status.metrics}
    assert metrics == {"perplexityOriginal": result.metrics.perplexity_original,
                       "perplexityCompressed": result.metrics.perplexity_compressed,
                       "perplexityIncreasePercent": result.metrics.perplexity_increase_percent,
                       "gate.maxPerplexityIncrease": 1000}

    job, pods = finished(0, term, failed=False)
    observation = observe(job, pods, kueue=False)
    assert observation.phase == "Succeeded" and observation.termination_message == term
    assert status_patch({}, 1, observation, progress)["result"] == status.model_dump(by_alias=True, exclude_none=True)


def test_the_operator_reads_why_a_run_failed(trained_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    # A failed quality gate: exit 3, the metrics that failed it, nothing published. Four bits, where
    # FP8 can leave a model this small as good as it was.
    code, term = run(tmp_path, evaluated_job(trained_llama, tmp_path, 0, "gated", "W4A16"))
    lines = capsys.readouterr().out.splitlines()
    assert code == ExitCode.QUALITY_GATE_FAILED
    failure = every_line_is_an_event(lines)[-1]
    assert isinstance(failure, FailureEvent) and failure.metrics.gate.passed is False
    assert parse_event(term) == failure.model_copy(update={"answers": None})
    job, pods = finished(code, term, failed=True)
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert failure_reason("PodFailurePolicy", terminated) == failure.reason == "QualityGateFailed"
    assert failure_message(terminated, "") == failure.message and "maxPerplexityIncrease" in failure.message
    observation = observe(job, pods, kueue=False)
    assert (observation.phase, observation.reason, observation.exit_code) == ("Failed", "QualityGateFailed", 3)
    assert parse_result(term) is None

    # An invalid spec: exit 2, every problem listed.
    doc = job_document(str(trained_llama), str(tmp_path / "invalid"), calibration={"numSamples": 0})
    code, term = run(tmp_path, doc)
    lines = capsys.readouterr().out.splitlines()
    assert code == ExitCode.INVALID_INPUT
    failure = every_line_is_an_event(lines)[-1]
    assert isinstance(failure, FailureEvent) and failure.problems == ["spec.calibration.numSamples: must be ≥ 1 (got 0)"]
    assert parse_event(term) == failure
    job, pods = finished(code, term, failed=True)
    observation = observe(job, pods, kueue=False)
    assert (observation.phase, observation.reason, observation.exit_code) == ("Failed", "InvalidSpec", 2)
    assert observation.message == failure.message == "invalid CompressionJob: spec.calibration.numSamples: must be ≥ 1 (got 0)"
    patch = status_patch({}, 1, observation, None)
    assert patch["failure"]["reason"] == "InvalidSpec" and patch["failure"]["exitCode"] == 2
