"""The CompressionJob status block, and how Job, pod and runner output map onto it.

Everything here is a pure function of plain dicts (the Job, its pods, the log tail), so the
whole lifecycle is tested without an API server. Users read `phase`; tools read the `Succeeded`
condition (Unknown while running, True or False at the end).
"""

import datetime
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelpress.contract import (EXIT_REASONS, PERMANENT_EXIT_CODES, ExitCode, FailureEvent, MemoryEstimate, ProgressEvent, ResultEvent,
                                 parse_event)

Phase = Literal["Pending", "Queued", "Suspended", "Running", "Succeeded", "Failed"]
TERMINAL_PHASES = ("Succeeded", "Failed")
REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
Text = Annotated[str, Field(max_length=1024)]
Time = Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]
Count = Annotated[int, Field(ge=0)]


class Wire(BaseModel):
    """camelCase on the wire, like the spec."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Condition(Wire):
    """A metav1.Condition."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=REASON)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: Time
    observed_generation: Count | None = None


class Progress(Wire):
    """The runner's last progress line, as of `lastUpdateTime`."""

    stage: Text | None = None
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    layers_done: Count | None = None
    layers_total: Count | None = None
    estimated_remaining_seconds: Count | None = None
    last_update_time: Time | None = None


class StageMemory(Wire):
    stage: Annotated[str, Field(max_length=64)]
    bytes: Count
    skipped: bool | None = None


class MemoryStatus(Wire):
    """The runner's memory estimate, made before it downloaded anything (its first progress line)."""

    peak_bytes: Count
    peak_stage: Annotated[str, Field(max_length=64)]
    limit_bytes: Count | None = None
    stages: Annotated[list[StageMemory], Field(max_length=16)] = Field(default_factory=list)


class Metric(Wire):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    value: float


class Result(Wire):
    """What the runner reported in its termination message when it succeeded."""

    uri: Text | None = None
    original_size_bytes: Count | None = None
    compressed_size_bytes: Count | None = None
    ratio: float | None = None
    duration_seconds: float | None = None
    metrics: Annotated[list[Metric], Field(max_length=16)] = Field(default_factory=list)


class Failure(Wire):
    """The last failure, structured for tools (reason) and humans (message)."""

    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=REASON)]
    message: Annotated[str, Field(max_length=4096)] = ""
    exit_code: int | None = None
    time: Time | None = None


class Status(Wire):
    phase: Phase | None = None
    observed_generation: Count | None = None
    job_name: Text | None = None
    recipe: Text | None = Field(None, description="the recipe in a few words, for the printer column")
    start_time: Time | None = None
    completion_time: Time | None = None
    conditions: Annotated[list[Condition], Field(max_length=8)] = Field(default_factory=list)
    progress: Progress | None = None
    memory_estimate: MemoryStatus | None = None
    result: Result | None = None
    failure: Failure | None = None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Observation(BaseModel):
    """What the Job and its pods say about the run, before it is turned into a status."""

    phase: Phase
    reason: str
    message: str = ""
    exit_code: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    termination_message: str | None = None


def _true(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _terminated(pods: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The runner container's last terminated state across the Job's pods (newest pod first)."""
    newest = sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True)
    for pod in newest:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
            if state:
                return state
    return None


def _waiting(pods: list[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why a pod is not running yet: a container waiting reason or an unschedulable pod."""
    for pod in pods:
        status = pod.get("status") or {}
        for container in status.get("containerStatuses") or []:
            waiting = container.get("state", {}).get("waiting")
            if waiting and waiting.get("reason"):
                return waiting["reason"], waiting.get("message", "")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", cond.get("message", "")
    return None


def failure_reason(job_reason: str | None, terminated: Mapping[str, Any] | None) -> str:
    """The CR's failure reason: the container's own cause first, then the Job controller's."""
    if terminated is not None:
        if terminated.get("reason") == "OOMKilled":
            return "OOMKilled"
        exit_code = terminated.get("exitCode")
        if exit_code in PERMANENT_EXIT_CODES:
            report = runner_report(terminated.get("message"))
            return report.reason if isinstance(report, FailureEvent) else EXIT_REASONS[exit_code]
    return job_reason or "JobFailed"


def failure_message(terminated: Mapping[str, Any] | None, fallback: str) -> str:
    """The runner's one-line message when it wrote one, else what the pod or the Job said."""
    raw = (terminated or {}).get("message") or ""
    report = runner_report(raw)
    if isinstance(report, FailureEvent) and report.message:
        return report.message[:4096]
    return (raw.strip() or fallback)[:4096]


def observe(job: Mapping[str, Any] | None, pods: list[Mapping[str, Any]], kueue: bool) -> Observation:
    """Reduce a Job and its pods to one phase with a reason (pure; FailureTarget alone is not terminal)."""
    if job is None:
        return Observation(phase="Pending", reason="JobNotCreated", message="the runner Job does not exist yet")
    status = job.get("status") or {}
    terminated = _terminated(pods)
    message = (terminated or {}).get("message") or ""
    times = {"start_time": status.get("startTime"), "completion_time": status.get("completionTime")}
    if _true(job, "Complete"):
        return Observation(phase="Succeeded", reason="Succeeded", message="the runner finished",
                           termination_message=message or None, exit_code=ExitCode.OK, **times)
    if failed := _true(job, "Failed"):
        reason = failure_reason(failed.get("reason"), terminated)
        return Observation(phase="Failed", reason=reason, message=failure_message(terminated, failed.get("message") or reason),
                           exit_code=(terminated or {}).get("exitCode"), termination_message=message or None,
                           start_time=times["start_time"], completion_time=failed.get("lastTransitionTime") or now())
    if (job.get("spec") or {}).get("suspend") and not status.get("active"):
        if kueue:
            return Observation(phase="Queued", reason="Queued", message="waiting for Kueue to admit the Job", **times)
        return Observation(phase="Suspended", reason="Suspended", message="spec.runtime.suspend is true", **times)
    if any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        return Observation(phase="Running", reason="Running", message="the runner is working", **times)
    if waiting := _waiting(pods):
        return Observation(phase="Pending", reason=waiting[0], message=waiting[1], **times)
    return Observation(phase="Pending", reason="PodPending", message="waiting for the runner pod to start", **times)


def parse_progress(log_tail: str, previous: Mapping[str, Any] | None = None) -> Progress | None:
    """The last ProgressEvent in the runner's output; keeps the old time if nothing moved."""
    for line in reversed(log_tail.splitlines()):
        event = parse_event(line)
        if not isinstance(event, ProgressEvent):
            continue
        progress = Progress(
            stage=event.stage[:1024],
            percent=max(0, min(100, round(event.percent))),
            layers_done=_count(event.layer),
            layers_total=_count(event.layers),
            estimated_remaining_seconds=_count(event.eta_seconds),
        )
        old = Progress.model_validate(previous) if previous else None
        same = old is not None and old.model_copy(update={"last_update_time": None}) == progress
        return progress.model_copy(update={"last_update_time": old.last_update_time if same else now()})
    return None


def parse_memory_estimate(log_tail: str) -> MemoryStatus | None:
    """The memory estimate of the runner's first progress line, when the tail still holds it."""
    for line in log_tail.splitlines():
        event = parse_event(line)
        if isinstance(event, ProgressEvent) and isinstance(event.memory, MemoryEstimate):
            memory = event.memory
            return MemoryStatus(peak_bytes=max(0, memory.peak_bytes), peak_stage=memory.peak_stage[:64],
                                limit_bytes=_count(memory.limit_bytes),
                                stages=[StageMemory(stage=s.stage[:64], bytes=max(0, s.bytes), skipped=s.skipped)
                                        for s in memory.stages[:16]])
    return None


def _count(value: float | None) -> int | None:
    return None if value is None else max(0, int(round(value)))


def runner_report(message: str | None) -> ResultEvent | FailureEvent | None:
    """The runner's last ResultEvent or FailureEvent (its termination message)."""
    for line in reversed((message or "").strip().splitlines()):
        event = parse_event(line)
        if isinstance(event, (ResultEvent, FailureEvent)):
            return event
    return None


def parse_result(message: str | None) -> Result | None:
    """status.result from the runner's ResultEvent: output URI, sizes, ratio, total time, metrics."""
    report = runner_report(message)
    if not isinstance(report, ResultEvent):
        return None
    sizes = report.sizes
    return Result(
        uri=report.output.uri if report.output else None,
        original_size_bytes=sizes.original_bytes if sizes else None,
        compressed_size_bytes=sizes.compressed_bytes if sizes else None,
        ratio=sizes.ratio if sizes else None,
        duration_seconds=(report.durations_s or {}).get("total"),
        metrics=_metrics(report.metrics.model_dump(by_alias=True, exclude_none=True) if report.metrics else {}, "")[:16],
    )


def _metrics(value: Any, prefix: str) -> list[Metric]:
    """The numbers of a nested dict, flattened to `a.b` names (booleans are not numbers here)."""
    if isinstance(value, dict):
        found: list[Metric] = []
        for key, item in value.items():
            name = f"{prefix}{key}"
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                found.append(Metric(name=name[:128], value=float(item)))
            else:
                found += _metrics(item, name + ".")
        return found
    return []


def set_condition(conditions: list[Mapping[str, Any]], new: Condition) -> list[dict[str, Any]]:
    """Replace the condition of `new.type`; its transition time moves only when its status flips."""
    out: list[dict[str, Any]] = []
    for cond in conditions:
        if cond.get("type") == new.type:
            if cond.get("status") == new.status:
                new = new.model_copy(update={"last_transition_time": cond["lastTransitionTime"]})
        else:
            out.append(dict(cond))
    out.append(new.model_dump(by_alias=True, exclude_none=True))
    return out


def succeeded_condition(phase: Phase, reason: str, message: str, generation: int) -> Condition:
    value = {"Succeeded": "True", "Failed": "False"}.get(phase, "Unknown")
    safe_reason = reason if re.match(REASON, reason or "") else "Unknown"
    return Condition(type="Succeeded", status=value, reason=safe_reason, message=message[:32768],
                     last_transition_time=now(), observed_generation=generation)


def status_patch(previous: Mapping[str, Any], generation: int, observation: Observation,
                 progress: Progress | None, memory: MemoryStatus | None = None) -> dict[str, Any]:
    """The status fields to write for `observation` (a merge patch over `previous`); a memory
    estimate once seen stays, as the log tail moves past it."""
    cond = succeeded_condition(observation.phase, observation.reason, observation.message, generation)
    patch: dict[str, Any] = {
        "phase": observation.phase,
        "observedGeneration": generation,
        "conditions": set_condition(previous.get("conditions") or [], cond),
    }
    if observation.start_time:
        patch["startTime"] = observation.start_time
    if progress is not None:
        patch["progress"] = progress.model_dump(by_alias=True, exclude_none=True)
    if memory is not None:
        patch["memoryEstimate"] = memory.model_dump(by_alias=True, exclude_none=True)
    if observation.phase == "Succeeded":
        patch["completionTime"] = observation.completion_time or now()
        result = parse_result(observation.termination_message)
        if result is not None:
            patch["result"] = result.model_dump(by_alias=True, exclude_none=True)
        patch["progress"] = {**(patch.get("progress") or previous.get("progress") or {}), "percent": 100, "lastUpdateTime": now()}
    if observation.phase == "Failed":
        patch["completionTime"] = observation.completion_time or now()
        patch["failure"] = Failure(reason=cond.reason, message=observation.message[:4096],
                                   exit_code=observation.exit_code, time=now()).model_dump(by_alias=True, exclude_none=True)
    return patch
