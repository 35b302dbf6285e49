"""What Kubernetes says when a run cannot go on, and the status each cause ends in (pure, no server)."""

import datetime
import json
from typing import Any

import pytest

from support.crd_schema import problems, with_defaults
from modelpress.operator.faults import creation_blocker, pod_blocker, refusal
from modelpress.operator.status import (Observation, escalate, finished_patch, newest_pod, observe, observe_without_job,
                                        reconciling, status_patch)

JOB = {"metadata": {"name": "j-runner", "uid": "job-uid"}, "spec": {}, "status": {"active": 1, "startTime": "2026-01-01T10:00:00Z"}}
RESULT = json.dumps({"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/x"},
                     "sizes": {"originalBytes": 10, "compressedBytes": 5, "ratio": 2.0}})


def pod(name: str, phase: str, created: str = "2026-01-01T10:00:00Z", waiting: dict[str, Any] | None = None,
        terminated: dict[str, Any] | None = None, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    state = {"waiting": waiting} if waiting else {"terminated": terminated} if terminated else {"running": {}} if phase == "Running" else {}
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"phase": phase, "containerStatuses": [{"name": "runner", "state": state}], "conditions": conditions or []}}


EVICTED = pod("j-runner-zzzzz", "Failed", terminated={"exitCode": 143, "reason": "Error"},
              conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "node drain"}])


@pytest.mark.parametrize("waiting, reason, kind", [
    ({"reason": "CreateContainerConfigError", "message": 'secret "models-s3" not found'}, "CreateContainerConfigError", "stalled"),
    ({"reason": "ImagePullBackOff", "message": "Back-off pulling image"}, "ImagePullBackOff", "stalled"),
    ({"reason": "ErrImagePull", "message": "unauthorized"}, "ErrImagePull", "stalled"),
    ({"reason": "InvalidImageName", "message": 'couldn\'t parse image name "Bad Image"'}, "InvalidImageName", "fatal"),
])
def test_a_container_that_cannot_start_says_why_and_how_bad(waiting: dict[str, str], reason: str, kind: str) -> None:
    blocker = pod_blocker(pod("p", "Pending", waiting=waiting))
    assert blocker is not None and (blocker.reason, blocker.kind) == (reason, kind)
    assert blocker.message == f"container runner: {waiting['message']}"


def test_a_pod_on_its_way_or_waiting_for_a_node_is_not_stuck() -> None:
    assert pod_blocker(pod("p", "Pending", waiting={"reason": "ContainerCreating"})) is None
    unschedulable = pod("p", "Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes have nvidia.com/gpu"}])
    blocker = pod_blocker(unschedulable)
    assert blocker is not None and (blocker.reason, blocker.kind) == ("Unschedulable", "waiting")
    observation = observe(JOB, [unschedulable], kueue=False)
    assert (observation.phase, observation.reason, observation.stalled) == ("Pending", "Unschedulable", False)
    assert observation.message == "0/3 nodes have nvidia.com/gpu"


@pytest.mark.parametrize("status, message, expected", [
    (403, 'jobs.batch "j" is forbidden: exceeded quota: batch, requested: count/jobs.batch=1', ("QuotaExceeded", "waiting")),
    (403, 'admission webhook "policy.example" denied the request: GPUs need a queue', ("JobRejected", "fatal")),
    (422, "spec.template.spec.containers[0].image: Required value", ("JobRejected", "fatal")),
    (400, "admission webhook denied the request", ("JobRejected", "fatal")),
    (500, "etcdserver: request timed out", None),
    (429, "too many requests", None),
])
def test_a_refused_create_waits_for_quota_fails_otherwise_and_leaves_server_faults_to_retries(
        status: int, message: str, expected: tuple[str, str] | None) -> None:
    blocker = refusal(status, message, "the runner Job j-runner")
    if expected is None:
        assert blocker is None
    else:
        assert blocker is not None and (blocker.reason, blocker.kind) == expected
        assert message in blocker.message and "the runner Job j-runner" in blocker.message


def failed_create(uid: str, message: str, time: str) -> dict[str, Any]:
    return {"involvedObject": {"kind": "Job", "name": "j-runner", "uid": uid}, "reason": "FailedCreate",
            "message": f"Error creating: {message}", "lastTimestamp": time, "type": "Warning"}


def test_pods_the_cluster_will_not_create_are_named_from_the_job_controllers_events() -> None:
    quota = failed_create("job-uid", 'pods "j-runner-x" is forbidden: exceeded quota: gpu, requested: requests.nvidia.com/gpu=1',
                          "2026-01-01T10:01:00Z")
    scc = failed_create("job-uid", 'pods "j-runner-x" is forbidden: unable to validate against any security context constraint',
                        "2026-01-01T10:02:00Z")
    older_job = failed_create("another-uid", "anything", "2026-01-01T10:03:00Z")
    blocker = creation_blocker([quota, older_job], JOB, None)
    assert blocker is not None and (blocker.reason, blocker.kind) == ("QuotaExceeded", "waiting")
    blocker = creation_blocker([quota, scc, older_job], JOB, None)
    assert blocker is not None and (blocker.reason, blocker.kind) == ("FailedCreate", "stalled")
    assert "security context constraint" in blocker.message
    # events from before the newest pod was made are history
    assert creation_blocker([quota, scc], JOB, datetime.datetime(2026, 1, 1, 10, 5, tzinfo=datetime.UTC)) is None
    observation = observe(JOB, [], kueue=False, events=[scc])
    assert (observation.phase, observation.reason, observation.stalled) == ("Pending", "FailedCreate", True)


def test_the_newest_pod_is_the_unfinished_one_whatever_the_names_and_clock_say() -> None:
    running = pod("j-runner-aaaaa", "Running")  # created in the same second as the evicted one, sorting before it
    assert newest_pod([EVICTED, running]) is running and newest_pod([running, EVICTED]) is running
    old, new = pod("j-runner-b", "Failed", "2026-01-01T10:00:00Z"), pod("j-runner-a", "Failed", "2026-01-01T11:00:00Z")
    assert newest_pod([old, new]) is new
    observation = observe(JOB, [EVICTED, running], kueue=False)
    assert observation.phase == "Running" and "try 2: the pod before it was stopped by the cluster (EvictionByEvictionAPI" in observation.message


def test_a_pod_lost_to_eviction_or_memory_awaiting_its_replacement_is_retrying() -> None:
    observation = observe(JOB, [EVICTED], kueue=False)
    assert (observation.phase, observation.reason) == ("Pending", "Retrying")
    assert "node drain" in observation.message and "resumes from the scratch volume" in observation.message
    oom = pod("j-runner-b", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    observation = observe(JOB, [oom], kueue=False)
    assert observation.reason == "Retrying" and "ran out of memory (OOMKilled)" in observation.message


def test_a_vanished_job_is_judged_by_its_last_pod() -> None:
    succeeded = pod("j-runner-a", "Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": RESULT, "startedAt": "2026-01-01T10:00:00Z", "finishedAt": "2026-01-01T10:30:00Z"})
    observation = observe_without_job([EVICTED, succeeded], "j-runner")
    assert (observation.phase, observation.termination_message, observation.completion_time) == (
        "Succeeded", RESULT, "2026-01-01T10:30:00Z")
    assert status_patch({}, 1, observation, None)["result"]["uri"] == "s3://models/x"
    invalid = pod("j-runner-a", "Failed", terminated={"exitCode": 2, "message": json.dumps(
        {"event": "failure", "reason": "InvalidInput", "exitCode": 2, "message": "model: not found"})})
    assert observe_without_job([invalid], "j-runner").reason == "InvalidInput"
    lost = observe_without_job([EVICTED], "j-runner")
    assert lost.reason == "JobDeleted" and "was stopped by the cluster" in lost.message
    assert observe_without_job([], "j-runner").reason == "JobDeleted"
    assert observe_without_job([pod("j-runner-a", "Running")], "j-runner").phase == "Running"


def stalled_status(since: str) -> dict[str, Any]:
    return {"conditions": [{"type": "Stalled", "status": "True", "reason": "CreateContainerConfigError",
                            "lastTransitionTime": since, "message": ""}]}


def test_a_stall_fails_the_run_once_it_has_lasted_the_timeout() -> None:
    stalled = Observation(phase="Pending", reason="CreateContainerConfigError", message="secret gone", stalled=True)
    clock = datetime.datetime(2026, 1, 1, 10, 15, tzinfo=datetime.UTC)
    assert escalate(stalled, stalled_status("2026-01-01T10:10:00Z"), clock, 600) == stalled
    assert escalate(stalled, {}, clock, 600) == stalled  # the stall starts now
    failed = escalate(stalled, stalled_status("2026-01-01T10:00:00Z"), clock, 600)
    assert (failed.phase, failed.reason) == ("Failed", "CreateContainerConfigError")
    assert failed.message.startswith("secret gone (blocked for 10 min or more")
    waiting = Observation(phase="Pending", reason="QuotaExceeded", message="full")
    assert escalate(waiting, stalled_status("2026-01-01T09:00:00Z"), clock, 600) == waiting


def test_stalled_and_reconciling_follow_the_run(validator: Any) -> None:
    body = with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "j"},
                          "spec": {"model": {"uri": "hf://a/b"}, "recipe": {"preset": "W8A8", "algorithm": "RTN"},
                                   "output": {"uri": "s3://models/x", "connection": "c"}}})
    stalled = status_patch({}, 1, Observation(phase="Pending", reason="ImagePullBackOff", message="no", stalled=True), None)
    conditions = {c["type"]: c for c in stalled["conditions"]}
    assert conditions["Stalled"]["status"] == "True" and conditions["Reconciling"]["status"] == "False"
    running = status_patch(stalled, 1, Observation(phase="Running", reason="Running"), None)
    assert {c["type"]: c["status"] for c in running["conditions"]} == {
        "Succeeded": "Unknown", "Ready": "False", "Reconciling": "True", "Stalled": "False"}
    done = status_patch(running, 1, Observation(phase="Succeeded", reason="Succeeded"), None)
    assert reconciling(done) and {c["type"]: c["reason"] for c in done["conditions"]}["Reconciling"] == "Finishing"
    final = {**done, **finished_patch(done, 1)}
    assert not reconciling(final) and {c["type"]: c["status"] for c in final["conditions"]} == {
        "Succeeded": "True", "Ready": "True", "Stalled": "False", "Reconciling": "False"}
    failed = status_patch(running, 1, Observation(phase="Failed", reason="OOMKilled", message="out of memory"), None)
    assert {c["type"]: c["status"] for c in failed["conditions"]}["Stalled"] == "False" and reconciling(failed)
    settled = {c["type"]: c for c in finished_patch(failed, 1)["conditions"]}
    assert (settled["Stalled"]["status"], settled["Stalled"]["reason"], settled["Reconciling"]["status"]) == ("True", "OOMKilled", "False")
    assert problems(validator, {**body, "status": final}) == []
