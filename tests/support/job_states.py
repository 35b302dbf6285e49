"""CompressionJobs as the operator leaves them, state by state, for the GitOps health tests.

Each state is a Job (and pods) as the Job controller and the kubelet report it, reduced by the
operator's own `observe` and `status_patch`, and for a finished run `finished_patch` (the pods
released), the way the sync handler does; the states the
handlers write without a Job (InvalidSpec, WaitingForReference, JobDeleted) use the handlers'
observations. Times are fixed so the samples stay byte-stable.
"""

import json
from collections.abc import Callable
from typing import Any

from modelpress.operator.conditions import UNOBSERVED
from modelpress.operator.status import TERMINAL_PHASES, Observation, Progress, finished_patch, observe, parse_progress, status_patch

START = "2026-01-01T10:00:00Z"
END = "2026-01-01T10:20:00Z"
RESULT = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/smollm2-w4a16", "files": 7},
          "sizes": {"originalBytes": 538000000, "compressedBytes": 150000000, "ratio": 3.59},
          "metrics": {"perplexityOriginal": 18.0, "perplexityCompressed": 19.4}, "durationsS": {"total": 1200.0}}
PROGRESS = {"event": "progress", "stage": "compress", "layer": 12, "layers": 30, "percent": 41.2, "etaSeconds": 300}


def job(*conditions: dict[str, Any], suspend: bool = False, active: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = {"startTime": START, "active": active, "conditions": list(conditions)}
    if any(c["type"] == "Complete" for c in conditions):
        status["completionTime"] = END
    return {"metadata": {"name": "smollm2-w4a16-runner"}, "spec": {"suspend": suspend}, "status": status}


def failed(reason: str) -> dict[str, Any]:
    return {"type": "Failed", "status": "True", "reason": reason, "message": "Job has failed", "lastTransitionTime": END}


def pod(phase: str, terminated: dict[str, Any] | None = None, waiting: dict[str, str] | None = None) -> dict[str, Any]:
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    return {"metadata": {"name": "smollm2-w4a16-runner-x1", "creationTimestamp": START},
            "status": {"phase": phase, "containerStatuses": [{"name": "runner", "state": state}]}}


def runner_failure(exit_code: int, reason: str, message: str) -> dict[str, Any]:
    event = {"event": "failure", "status": "Failed", "reason": reason, "exitCode": exit_code, "message": message}
    return {"exitCode": exit_code, "reason": "Error", "message": json.dumps(event)}


def _fixed(status: dict[str, Any]) -> dict[str, Any]:
    """Pin the times `now()` filled in, so a sample reads the same on every run."""
    for cond in status.get("conditions", []):
        cond["lastTransitionTime"] = START
    if "completionTime" in status:
        status["completionTime"] = END
    for section in ("progress", "failure"):
        for key in ("lastUpdateTime", "time"):
            if key in status.get(section, {}):
                status[section][key] = END
    return status


def with_status(status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
            "metadata": {"name": "smollm2-w4a16", "namespace": "ml", "generation": generation},
            "spec": {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, "recipe": {"preset": "W4A16"},
                     "calibration": {"dataset": "self-generated"}, "output": {"uri": "s3://models/smollm2-w4a16", "connection": "models-s3"}},
            "status": status}


def compression_job(observation: Observation, progress: Progress | None = None, generation: int = 1,
                    observed: int | None = None) -> dict[str, Any]:
    """The CompressionJob with the status the operator writes for `observation` at `observed` (default: generation)."""
    seen_at = generation if observed is None else observed
    status = status_patch({}, seen_at, observation, progress)
    if observation.phase in TERMINAL_PHASES:
        status.update(finished_patch(status, seen_at))
    status["jobName"] = "smollm2-w4a16-runner"
    return with_status(_fixed(status), generation)


def seen(job_: dict[str, Any] | None, pods: list[dict[str, Any]], kueue: bool = False, log: str = "", **kwargs: Any) -> dict[str, Any]:
    progress = parse_progress(log) if log else None
    return compression_job(observe(job_, pods, kueue), progress, **kwargs)


# The failure reasons the operator writes, each from the Job and pod state that causes it.
FAILURES: dict[str, Callable[[], dict[str, Any]]] = {
    "InvalidSpec": lambda: compression_job(Observation(
        phase="Failed", reason="InvalidSpec", message="spec.output.uri: a local path is lost with the pod; use s3:// or pvc://")),
    "InvalidInput": lambda: seen(job(failed("PodFailurePolicy")), [pod("Failed", runner_failure(
        2, "InvalidInput", "model: hf://acme/missing not found; check spec.model.uri"))]),
    "QualityGateFailed": lambda: seen(job(failed("PodFailurePolicy")), [pod("Failed", runner_failure(
        3, "QualityGateFailed", "perplexity rose 14.0%, past the 10% spec.evaluation.maxPerplexityIncrease"))]),
    "OOMKilled": lambda: seen(job(failed("BackoffLimitExceeded")), [pod("Failed", {"exitCode": 137, "reason": "OOMKilled"})]),
    "BackoffLimitExceeded": lambda: seen(job(failed("BackoffLimitExceeded")), [pod("Failed", {
        "exitCode": 1, "reason": "Error", "message": "connection reset by peer"})]),
    "DeadlineExceeded": lambda: seen(job(failed("DeadlineExceeded")), []),
    "PodFailurePolicy": lambda: seen(job(failed("PodFailurePolicy")), []),
    "JobDeleted": lambda: compression_job(Observation(
        phase="Failed", reason="JobDeleted", message="Job smollm2-w4a16-runner was deleted before it finished; create a new CompressionJob")),
}

# Every other state a CompressionJob passes through.
STATES: dict[str, Callable[[], dict[str, Any]]] = {
    "new": lambda: with_status(dict(UNOBSERVED)),  # created; the operator has not seen it (the CRD's status default)
    "waiting-for-reference": lambda: compression_job(Observation(
        phase="Pending", reason="WaitingForReference", message="spec.output.connection: Secret models-s3 does not exist")),
    "pending": lambda: seen(job(), []),
    "pending-image-pull": lambda: seen(job(), [pod("Pending", waiting={
        "reason": "ImagePullBackOff", "message": "Back-off pulling image quay.io/modelpress/runner:0.1.0"})]),
    "queued": lambda: seen(job(suspend=True), [], kueue=True),
    "suspended": lambda: seen(job(suspend=True), []),
    "running": lambda: seen(job(active=1), [pod("Running")], log=json.dumps(PROGRESS)),
    "succeeded": lambda: seen(job({"type": "Complete", "status": "True"}), [pod("Succeeded", {
        "exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)})]),
    "succeeded-spec-changed": lambda: seen(job({"type": "Complete", "status": "True"}), [pod("Succeeded", {
        "exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)})], generation=2, observed=1),
    **{f"failed-{reason}": build for reason, build in FAILURES.items()},
}
