"""Faults of the cluster around a run, each ending in a status with a reason within two syncs, never
in a silent retry loop: kopf in-process against the emulated API server."""

import dataclasses
import json
from typing import Any

import pytest

from support.kube import (CLAIMS, CR, FAST, JOBS, NAMESPACE, PODS, api, create_cr, create_secret, eventually, obj,
                          operator_running, pod_of, put_pod, set_job_status)
from modelpress.operator.job_builder import OUTCOME_FINALIZER, claim_name, job_name

S3 = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_S3_ENDPOINT": "https://s3.example.internal"}
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny-llama"},
    "recipe": {"preset": "W8A8", "algorithm": "RTN"},
    "output": {"uri": "s3://models/tiny-w8a8", "connection": "models-s3"},
}
RESULT = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/tiny-w8a8", "files": 3},
          "sizes": {"originalBytes": 1000, "compressedBytes": 400, "ratio": 2.5}}
# Condition times have whole seconds, so a stall can look up to a second older than it is.
STALLS_FAST = dataclasses.replace(FAST, stall_timeout=1.5)
# Two syncs of this interval leave the launch (a few API calls) ample time on a busy machine.
LAUNCH_PACED = dataclasses.replace(FAST, sync_interval=0.5)


def status_of(kube: Any, name: str = "tiny") -> dict[str, Any]:
    return (obj(kube, CR, name) or {}).get("status") or {}


def condition(kube: Any, kind: str = "Succeeded", name: str = "tiny") -> dict[str, Any]:
    return next((c for c in status_of(kube, name).get("conditions") or [] if c["type"] == kind), {})


def warnings(kube: Any, reason: str) -> list[dict[str, Any]]:
    """The Warning events of `reason`. kopf posts events from a queue after a handler returns, so a
    test waits for them with `eventually` rather than reading them the moment a status lands."""
    return [item.raw for (resource, _, _), item in kube.objects.items() if resource.plural == "events"
            and not item.deleted and item.raw.get("reason") == reason and item.raw.get("type") == "Warning"]


async def started(kube: Any, calls: Any, name: str = "tiny") -> dict[str, Any]:
    """Create the CompressionJob and return its Job once the operator has recorded it."""
    await create_cr(kube, name, SPEC)
    await eventually(lambda: status_of(kube, name).get("jobName"))
    return obj(kube, JOBS, job_name(name))


async def in_two_syncs(calls: Any) -> None:
    await calls.wait("sync", 2)


@pytest.mark.asyncio
async def test_a_name_of_120_characters_runs_to_succeeded(kube, validator) -> None:
    name = "llama-3-1-8b-instruct-w4a16-gptq-" + "calibrated-on-ultrachat-" * 3 + "x" * 15
    name = name[:120].rstrip("-")
    assert len(name) == 120
    await create_secret(kube, "models-s3", S3)
    async with operator_running() as calls:
        job = await started(kube, calls, name)
        assert job is not None and len(job["metadata"]["name"]) <= 63
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert all(len(value) <= 63 for value in labels.values())
        assert job["spec"]["template"]["metadata"]["annotations"]["modelpress.dev/compressionjob-name"] == name
        assert obj(kube, CLAIMS, claim_name(name)) is not None
        await set_job_status(kube, job["metadata"]["name"], {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        await put_pod(kube, pod_of(job, "abcde", {"phase": "Running", "containerStatuses": [{"name": "runner", "state": {"running": {}}}]}))
        await eventually(lambda: status_of(kube, name).get("phase") == "Running")
        await put_pod(kube, pod_of(job, "abcde", {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "state": {
            "terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)}}}]}))
        await set_job_status(kube, job["metadata"]["name"], {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: status_of(kube, name).get("phase") == "Succeeded")
        assert status_of(kube, name)["result"]["ratio"] == 2.5
        await eventually(lambda: condition(kube, "Reconciling", name).get("status") == "False")


@pytest.mark.asyncio
@pytest.mark.parametrize("status, reason, message, phase, expected", [
    (403, "Forbidden", 'admission webhook "gpu-policy.example" denied the request: a GPU job needs a queue', "Failed", "JobRejected"),
    (422, "Invalid", "spec.template.spec.priorityClassName: Not found: batch-high", "Failed", "JobRejected"),
    (403, "Forbidden", 'jobs.batch "tiny-runner" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1, used: 5, limited: 5',
     "Pending", "QuotaExceeded"),
])
async def test_a_refused_job_create_ends_failed_or_pending_with_the_servers_words(
        kube, validator, status: int, reason: str, message: str, phase: str, expected: str) -> None:
    await create_secret(kube, "models-s3", S3)
    kube.refuse("jobs", status, reason, message)
    async with operator_running(LAUNCH_PACED) as calls:
        await create_cr(kube, "tiny", SPEC)
        await in_two_syncs(calls)
        assert status_of(kube)["phase"] == phase
        assert condition(kube)["reason"] == expected and message in condition(kube)["message"]
        if phase == "Failed":
            assert status_of(kube)["failure"]["reason"] == expected
            await eventually(lambda: warnings(kube, expected))
            launches = calls.count["launch"]
            await calls.wait("sync", 3)
            assert calls.count["launch"] == launches, "a refused Job is not retried"
        else:  # a full quota is retried, and the Job is made once there is room
            kube.refusals.clear()
            await eventually(lambda: obj(kube, JOBS, "tiny-runner"))
            await eventually(lambda: condition(kube)["reason"] in ("JobCreated", "PodPending"))
    assert obj(kube, CR, "tiny") is not None


@pytest.mark.asyncio
async def test_a_refused_scratch_claim_fails_the_run_before_any_job(kube) -> None:
    await create_secret(kube, "models-s3", S3)
    kube.refuse("persistentvolumeclaims", 422, "Invalid", 'spec.storageClassName: storageclass "gold" is not allowed here')
    async with operator_running(LAUNCH_PACED) as calls:
        await create_cr(kube, "tiny", SPEC)
        await in_two_syncs(calls)
        assert status_of(kube)["phase"] == "Failed"
    assert condition(kube)["reason"] == "JobRejected" and "the scratch claim tiny-scratch" in condition(kube)["message"]
    assert obj(kube, JOBS, "tiny-runner") is None


async def failed_create(kube: Any, job: dict[str, Any], message: str) -> None:
    """The Job controller's event when the API server refuses the pod it tries to make."""
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "tiny-runner.1", "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "namespace": NAMESPACE,
                           "uid": job["metadata"]["uid"]},
        "reason": "FailedCreate", "type": "Warning", "message": f"Error creating: {message}",
        "lastTimestamp": "2099-01-01T00:00:00Z", "count": 3})


@pytest.mark.asyncio
async def test_pods_the_quota_will_not_admit_keep_the_run_pending_with_the_reason(kube) -> None:
    await create_secret(kube, "models-s3", S3)
    async with operator_running(STALLS_FAST) as calls:
        job = await started(kube, calls)
        await set_job_status(kube, "tiny-runner", {"startTime": "2026-01-01T10:00:00Z"})
        await failed_create(kube, job, 'pods "tiny-runner-x" is forbidden: exceeded quota: compute, requested: limits.memory=16Gi')
        await in_two_syncs(calls)
        assert (status_of(kube)["phase"], condition(kube)["reason"]) == ("Pending", "QuotaExceeded")
        assert "limits.memory=16Gi" in condition(kube)["message"] and condition(kube, "Stalled")["status"] == "False"
        await calls.wait("sync", 20)  # past the stall timeout: a quota waits, bounded by the Job's deadline alone
        assert status_of(kube)["phase"] == "Pending" and obj(kube, JOBS, "tiny-runner") is not None


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["scc", "secret", "image"])
async def test_a_stall_only_a_person_can_fix_is_pending_then_failed_and_the_job_stopped(kube, fault: str) -> None:
    await create_secret(kube, "models-s3", S3)
    async with operator_running(STALLS_FAST) as calls:
        job = await started(kube, calls)
        await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        if fault == "scc":
            reason, words = "FailedCreate", "unable to validate against any security context constraint"
            await failed_create(kube, job, f'pods "tiny-runner-x" is forbidden: {words}: [provider "restricted-v2": runAsUser]')
        else:
            reason, words = {"secret": ("CreateContainerConfigError", 'secret "models-s3" not found'),
                             "image": ("ImagePullBackOff", 'Back-off pulling image "quay.io/nope/runner:1"')}[fault]
            await put_pod(kube, pod_of(job, "abcde", {"phase": "Pending", "containerStatuses": [
                {"name": "runner", "state": {"waiting": {"reason": reason, "message": words}}}]}))
        await in_two_syncs(calls)
        assert (status_of(kube)["phase"], condition(kube)["reason"]) == ("Pending", reason)
        assert words in condition(kube)["message"] and condition(kube, "Stalled")["status"] == "True"
        await eventually(lambda: warnings(kube, reason))
        await eventually(lambda: status_of(kube).get("phase") == "Failed", timeout=5)
        assert status_of(kube)["failure"]["reason"] == reason and "blocked for" in status_of(kube)["failure"]["message"]
        await eventually(lambda: obj(kube, JOBS, "tiny-runner") is None)  # nothing starts after the run has failed
        await eventually(lambda: condition(kube, "Reconciling").get("status") == "False")
        if fault != "scc":  # the pod is released for the garbage collector (which the emulator lacks)
            assert OUTCOME_FINALIZER not in obj(kube, PODS, "tiny-runner-abcde")["metadata"]["finalizers"]


@pytest.mark.asyncio
async def test_an_image_name_that_cannot_parse_fails_at_once(kube) -> None:
    await create_secret(kube, "models-s3", S3)
    async with operator_running() as calls:
        job = await started(kube, calls)
        await put_pod(kube, pod_of(job, "abcde", {"phase": "Pending", "containerStatuses": [{"name": "runner", "state": {
            "waiting": {"reason": "InvalidImageName", "message": 'couldn\'t parse image name "Quay.io/Runner"'}}}]}))
        await in_two_syncs(calls)
        assert (status_of(kube)["phase"], status_of(kube)["failure"]["reason"]) == ("Failed", "InvalidImageName")
        await eventually(lambda: obj(kube, JOBS, "tiny-runner") is None)


@pytest.mark.asyncio
async def test_an_unschedulable_pod_waits_with_the_schedulers_words(kube) -> None:
    await create_secret(kube, "models-s3", S3)
    async with operator_running(STALLS_FAST) as calls:
        job = await started(kube, calls)
        message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"
        await put_pod(kube, pod_of(job, "abcde", {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}))
        await in_two_syncs(calls)
        assert (status_of(kube)["phase"], condition(kube)["reason"], condition(kube)["message"]) == ("Pending", "Unschedulable", message)
        await calls.wait("sync", 20)
        assert status_of(kube)["phase"] == "Pending"  # capacity may come (an autoscaler); the deadline bounds the wait
    assert obj(kube, JOBS, "tiny-runner")["spec"]["activeDeadlineSeconds"] == FAST.active_deadline_seconds


@pytest.mark.asyncio
async def test_events_of_the_faults_reach_the_compressionjob(kube) -> None:
    await create_secret(kube, "models-s3", S3)
    async with operator_running() as calls:
        job = await started(kube, calls)
        await put_pod(kube, pod_of(job, "abcde", {"phase": "Pending", "containerStatuses": [{"name": "runner", "state": {
            "waiting": {"reason": "ErrImagePull", "message": "unauthorized: authentication required"}}}]}))
        await in_two_syncs(calls)
        await eventually(lambda: warnings(kube, "ErrImagePull"))
    found = warnings(kube, "ErrImagePull")
    assert len(found) == 1 and found[0]["involvedObject"]["name"] == "tiny"
    assert "unauthorized" in found[0]["message"]
