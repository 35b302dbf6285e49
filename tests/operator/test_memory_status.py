"""The runner's memory estimate, mirrored into the CompressionJob's status and kept there."""

import json
from typing import Any

from support.crd_schema import problems, with_defaults
from modelpress.contract import MemoryEstimate, ProgressEvent, StageMemory
from modelpress.operator.status import Observation, parse_memory_estimate, status_patch

GiB = 1 << 30
ESTIMATE = MemoryEstimate(peak_bytes=3 * GiB, peak_stage="compress", limit_bytes=16 * GiB,
                          stages=[StageMemory(stage="runtime", bytes=GiB // 2), StageMemory(stage="compress", bytes=3 * GiB),
                                  StageMemory(stage="answers", bytes=20 * GiB, skipped=True)],
                          activation_storage="bfloat16")
FIRST = ProgressEvent(stage="preflight", percent=100.0, memory=ESTIMATE).to_json()
LAYER = json.dumps({"event": "progress", "stage": "compress", "percent": 40.0, "layer": 12, "layers": 30})
RUNNING = Observation(phase="Running", reason="Running", message="the runner is working")


def test_the_first_progress_line_becomes_status_memory_estimate(validator: Any) -> None:
    memory = parse_memory_estimate("\n".join(["log line", FIRST, LAYER]))
    assert memory is not None and (memory.peak_bytes, memory.peak_stage, memory.limit_bytes) == (3 * GiB, "compress", 16 * GiB)
    assert [(s.stage, s.skipped) for s in memory.stages] == [("runtime", None), ("compress", None), ("answers", True)]
    patch = status_patch({}, 1, RUNNING, None, memory)
    assert patch["memoryEstimate"] == {"peakBytes": 3 * GiB, "peakStage": "compress", "limitBytes": 16 * GiB, "stages": [
        {"stage": "runtime", "bytes": GiB // 2}, {"stage": "compress", "bytes": 3 * GiB},
        {"stage": "answers", "bytes": 20 * GiB, "skipped": True}], "activationStorage": "bfloat16"}
    body = with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                          "metadata": {"name": "job", "namespace": "ml"},
                          "spec": {"model": {"uri": "/models/llama"}, "recipe": {"preset": "W4A16"},
                                   "calibration": {"dataset": "self-generated"}, "output": {"uri": "/out"}}})
    assert problems(validator, {**body, "status": patch}) == []
    wrong = {**patch, "memoryEstimate": {**patch["memoryEstimate"], "activationStorage": "int4"}}
    assert problems(validator, {**body, "status": wrong})  # the CRD's schema holds the same choices


def test_a_tail_past_the_first_line_leaves_the_estimate_as_it_was() -> None:
    assert parse_memory_estimate(LAYER) is None
    patch = status_patch({"memoryEstimate": {"peakBytes": 1, "peakStage": "compress"}}, 1, RUNNING, None, None)
    assert "memoryEstimate" not in patch  # a merge patch without it keeps what the status holds
