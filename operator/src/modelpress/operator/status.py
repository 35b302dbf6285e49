"""The CompressionJob status block, and how Job, pod and runner output map onto it.

Everything here is a pure function of plain dicts (the Job, its pods, the log tail), so the
whole lifecycle is tested without an API server. Users read `phase`; tools read the `Succeeded`
condition (Unknown while running, True or False at the end) and the kstatus set (conditions.py).
"""

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelpress.operator.faults import Blocker, creation_blocker, parse_time, pod_blocker
from modelpress.contract import (EXIT_REASONS, PERMANENT_EXIT_CODES, ActivationStorage, ExitCode, FailureEvent, MemoryEstimate,
                                 ProgressEvent, ResultEvent, Served, parse_event)
from modelpress.operator.conditions import RECONCILING, TERMINAL_PHASES, kstatus_conditions

Phase = Literal["Pending", "Queued", "Suspended", "Running", "Succeeded", "Failed"]
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
    activation_storage: ActivationStorage | None = None  # what `activationStorage: auto` chose, or the spec's choice


class Metric(Wire):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    value: float


class ServedAnswer(Wire):
    prompt: Text
    answer: Text


class ServedStatus(Wire):
    """What vLLM made of the output before it was published (spec.evaluation.servable); its NLL is in the metrics."""

    served_by: Annotated[str, Field(max_length=128)]
    loaded: bool
    reason: Text | None = None
    tokens: Count | None = None
    quantization: Annotated[str, Field(max_length=128)] | None = None
    kernels: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=8)] = Field(default_factory=list)
    answers: Annotated[list[ServedAnswer], Field(max_length=32)] = Field(default_factory=list)


class Result(Wire):
    """What the runner reported in its termination message when it succeeded."""

    uri: Text | None = None
    original_size_bytes: Count | None = None
    compressed_size_bytes: Count | None = None
    ratio: float | None = None
    duration_seconds: float | None = None
    metrics: Annotated[list[Metric], Field(max_length=16)] = Field(default_factory=list)
    served: ServedStatus | None = None


class Failure(Wire):
    """The last failure, structured for tools (reason) and humans (message)."""

    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=REASON)]
    message: Annotated[str, Field(max_length=4096)] = ""
    exit_code: int | None = None
    time: Time | None = None


class OutputStatus(Wire):
    """The connection published for the output: the dashboard and InferenceServices reach it as connection + path."""

    uri: Text | None = None
    connection: Text | None = None
    path: Text | None = None


class ServingStatus(Wire):
    """The InferenceService serving the output, as of the last look at it."""

    name: Text | None = None
    runtime: Text | None = None
    url: Text | None = None
    ready: bool | None = None


class RegistryStatus(Wire):
    """Where the output is registered, or how registering it goes (attempts, next try)."""

    model_name: Text | None = None
    version: Text | None = None
    registered_model_id: Text | None = None
    model_version_id: Text | None = None
    model_artifact_id: Text | None = None
    attempts: Count | None = None
    next_attempt_time: Time | None = None


class Status(Wire):
    phase: Phase | None = None
    observed_generation: Annotated[int, Field(ge=-1)] | None = Field(None, description="-1 until the operator has seen the job")
    job_name: Text | None = None
    scratch_claim: Text | None = Field(None, description="the scratch PersistentVolumeClaim every pod of the run mounts")
    recipe: Text | None = Field(None, description="the recipe in a few words, for the printer column")
    start_time: Time | None = None
    completion_time: Time | None = None
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    progress: Progress | None = None
    memory_estimate: MemoryStatus | None = None
    result: Result | None = None
    failure: Failure | None = None
    output: OutputStatus | None = None
    serving: ServingStatus | None = None
    registry: RegistryStatus | None = None


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
    stalled: bool = False  # blocked on something only a person can fix


def _true(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def newest_pod(pods: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The Job's current pod. With one pod at a time, replaced only once it has failed, an unfinished
    pod is the newest, a succeeded one ends the Job, and failed ones are ordered by creation."""
    def rank(pod: Mapping[str, Any]) -> tuple[int, str, str]:
        order = {"Failed": 0, "Succeeded": 1}.get((pod.get("status") or {}).get("phase"), 2)
        meta = pod.get("metadata") or {}
        return order, meta.get("creationTimestamp") or "", meta.get("name") or ""

    return max(pods, key=rank) if pods else None


def _terminated(pod: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The runner container's terminated state in `pod` (the pod's one container)."""
    for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")
        if state:
            return state
    return None


def _waiting_reason(pod: Mapping[str, Any]) -> str | None:
    """A container's waiting reason on the way to running (ContainerCreating, PodInitializing)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        reason = ((status.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            return reason
    return None


def pod_ending(pod: Mapping[str, Any]) -> str:
    """How a finished pod ended, in a few words."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"was stopped by the cluster ({cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or 'evicted'})"
    terminated = _terminated(pod) or {}
    if terminated.get("reason") == "OOMKilled":
        return "ran out of memory (OOMKilled)"
    if "exitCode" in terminated:
        return f"exited with code {terminated['exitCode']}"
    return f"ended ({(pod.get('status') or {}).get('reason') or 'no reason given'})"


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


def _blocked(blocker: Blocker, **times: str | None) -> Observation:
    phase: Phase = "Failed" if blocker.kind == "fatal" else "Pending"
    completion = {"completion_time": now()} if phase == "Failed" else {}
    return Observation(phase=phase, reason=blocker.reason, message=blocker.message, stalled=blocker.kind == "stalled",
                       **{**times, **completion})


def _retry_note(pod: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> str:
    """Which try `pod` is, and how the one before it ended; empty for the first."""
    before = [p for p in pods if p is not pod and finished(p)]
    if not before:
        return ""
    return f" (try {len(before) + 1}: the pod before it {pod_ending(newest_pod(before) or before[-1])})"


def _unfinished(pod: Mapping[str, Any], pods: list[Mapping[str, Any]], **times: str | None) -> Observation:
    """A pod on its way: running, blocked, or still starting."""
    note = _retry_note(pod, pods)
    if (pod.get("status") or {}).get("phase") == "Running":
        return Observation(phase="Running", reason="Running", message="the runner is working" + note, **times)
    if blocker := pod_blocker(pod):
        return _blocked(blocker, **times)
    return Observation(phase="Pending", reason=_waiting_reason(pod) or "PodPending",
                       message="waiting for the runner pod to start" + note, **times)


def observe(job: Mapping[str, Any], pods: list[Mapping[str, Any]], kueue: bool,
            events: Sequence[Mapping[str, Any]] = ()) -> Observation:
    """Reduce a Job, its pods and its events to one phase with a reason (FailureTarget alone is not terminal)."""
    status = job.get("status") or {}
    pod = newest_pod(pods)
    terminated = _terminated(pod)
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
    start = {"start_time": times["start_time"]}
    if pod is not None and not finished(pod):
        return _unfinished(pod, pods, **start)
    since = parse_time((pod or {}).get("metadata", {}).get("creationTimestamp"))
    if blocker := creation_blocker(events, job, since):
        return _blocked(blocker, **start)
    if pod is not None:
        return Observation(phase="Pending", reason="Retrying",
                           message=f"the runner pod {pod_ending(pod)}; the Job starts another, which resumes from the scratch volume", **start)
    return Observation(phase="Pending", reason="PodPending", message="waiting for the runner pod to be created", **start)


def observe_without_job(pods: list[Mapping[str, Any]], job_name: str) -> Observation:
    """The outcome when the Job is gone (its TTL, a person): its pods, which the outcome finalizer
    keeps until the operator has read them, say how the run ended."""
    pod = newest_pod(pods)
    if pod is None:
        return Observation(phase="Failed", reason="JobDeleted", completion_time=now(),
                           message=f"Job {job_name} was deleted before it finished; create a new CompressionJob")
    if not finished(pod):
        return _unfinished(pod, pods)
    terminated = _terminated(pod) or {}
    times = {"start_time": terminated.get("startedAt"), "completion_time": terminated.get("finishedAt") or now()}
    message = terminated.get("message") or None
    if pod["status"]["phase"] == "Succeeded":
        return Observation(phase="Succeeded", reason="Succeeded", message="the runner finished", termination_message=message,
                           exit_code=ExitCode.OK, **times)
    if terminated.get("exitCode") in PERMANENT_EXIT_CODES:
        reason = failure_reason(None, terminated)
        return Observation(phase="Failed", reason=reason, message=failure_message(terminated, reason),
                           exit_code=terminated.get("exitCode"), termination_message=message, **times)
    return Observation(phase="Failed", reason="JobDeleted", exit_code=terminated.get("exitCode"), **times,
                       message=f"Job {job_name} was deleted before it finished (its last pod {pod_ending(pod)}); "
                               "create a new CompressionJob")


def stalled_since(status: Mapping[str, Any]) -> datetime.datetime | None:
    """When the run became stalled, from its Stalled condition (whose time moves only when it flips)."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return parse_time(cond.get("lastTransitionTime"))
    return None


def escalate(observation: Observation, status: Mapping[str, Any], clock: datetime.datetime, stall_timeout: float) -> Observation:
    """A stall that has lasted `stall_timeout` seconds ends the run: Failed, with the stall's reason."""
    since = stalled_since(status) if observation.stalled else None
    if since is None or (clock - since).total_seconds() < stall_timeout:
        return observation
    lasted = f"{round(stall_timeout)} s" if stall_timeout < 120 else f"{round(stall_timeout / 60)} min"
    return observation.model_copy(update={
        "phase": "Failed", "completion_time": now(),
        "message": f"{observation.message} (blocked for {lasted} or more; fix it and create a new CompressionJob)"})


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
                                        for s in memory.stages[:16]],
                                activation_storage=memory.activation_storage)
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
        served=served_status(report.served) if report.served else None,
    )


def served_status(served: Served) -> ServedStatus:
    """The runner's `served` block cut to the status' bounds (a newer runner may say more)."""
    return ServedStatus(
        served_by=served.served_by[:128], loaded=served.loaded, reason=served.reason[:1024] if served.reason else None,
        tokens=_count(served.tokens), quantization=served.quantization[:128] if served.quantization else None,
        kernels=[k[:128] for k in (served.kernels or [])[:8]],
        answers=[ServedAnswer(prompt=a.prompt[:1024], answer=a.answer[:1024]) for a in (served.answers or [])[:32]])


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


def _condition(kind: str, value: str, reason: str, message: str, generation: int) -> Condition:
    safe_reason = reason if re.match(REASON, reason or "") else "Unknown"
    return Condition(type=kind, status=value, reason=safe_reason, message=message[:32768],
                     last_transition_time=now(), observed_generation=generation)


def succeeded_condition(phase: Phase, reason: str, message: str, generation: int) -> Condition:
    return _condition("Succeeded", {"Succeeded": "True", "Failed": "False"}.get(phase, "Unknown"), reason, message, generation)


def _kstatus(conditions: list[dict[str, Any]], phase: str, blocked: bool, released: bool, reason: str, message: str,
             generation: int) -> list[dict[str, Any]]:
    """`conditions` with Ready, Reconciling and Stalled as conditions.py rules them; after the outcome,
    Reconciling says what the operator is still doing, or that it is done."""
    for kstatus in kstatus_conditions(phase, blocked, released):
        why, text = reason, message
        if kstatus.type == RECONCILING and phase in TERMINAL_PHASES:
            why, text = ("Finishing", "releasing what the run held") if kstatus.status == "True" else (
                phase, "the operator is done with this run")
        conditions = set_condition(conditions, _condition(kstatus.type, kstatus.status, why, text, generation))
    return conditions


def status_patch(previous: Mapping[str, Any], generation: int, observation: Observation,
                 progress: Progress | None, memory: MemoryStatus | None = None) -> dict[str, Any]:
    """The status fields to write for `observation` (a merge patch over `previous`).

    Besides `Succeeded`, Ready and the kstatus pair that Flux and Argo CD read (conditions.py): after
    the outcome Reconciling stays True until the operator has finished with the run (its pods
    released, its scratch claim deleted when asked: `finished_patch`). A memory estimate once seen
    stays, as the log tail moves past it.
    """
    cond = succeeded_condition(observation.phase, observation.reason, observation.message, generation)
    conditions = set_condition(previous.get("conditions") or [], cond)
    conditions = _kstatus(conditions, observation.phase, observation.stalled, False, cond.reason, observation.message, generation)
    patch: dict[str, Any] = {
        "phase": observation.phase,
        "observedGeneration": generation,
        "conditions": conditions,
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


def reconciling(status: Mapping[str, Any]) -> bool:
    """Whether the operator still has work on this run (a missing condition: a run from before it existed)."""
    return any(c.get("type") == "Reconciling" and c.get("status") == "True" for c in status.get("conditions") or [])


def finished_patch(previous: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """Reconciling turns False (and Stalled True after a failure): nothing of the finished run is held any more."""
    conditions = [dict(c) for c in previous.get("conditions") or []]
    outcome = next((c for c in conditions if c.get("type") == "Succeeded"), {})
    phase = previous.get("phase") or "Unknown"
    return {"conditions": _kstatus(conditions, phase, False, True, outcome.get("reason") or phase,
                                   outcome.get("message") or "", generation)}
