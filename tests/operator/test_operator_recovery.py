"""Nothing finished is wasted: every pod retry mounts the run's one scratch claim, and a run whose Job
vanished (its TTL, a person, while the operator was down) is reported from what survives."""

import dataclasses
import json
from typing import Any

import pytest

from support.kube import (CLAIMS, CR, FAST, JOBS, NAMESPACE, PODS, api, claims_of, cr_path, create_cr, create_secret,
                          eventually, obj, operator_running, pod_of, put_pod, set_job_status)
from modelpress.operator.job_builder import OUTCOME_FINALIZER

S3 = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_S3_ENDPOINT": "https://s3.example.internal"}
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny-llama"},
    "recipe": {"preset": "W4A16", "algorithm": "GPTQ"},
    "calibration": {"dataset": "self-generated", "numSamples": 16},
    "output": {"uri": "s3://models/tiny-w4a16", "connection": "models-s3"},
    "runtime": {"backoffLimit": 2, "resources": {"scratch": "20Gi"}},
}
RESULT = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/tiny-w4a16", "files": 3},
          "sizes": {"originalBytes": 1000, "compressedBytes": 300, "ratio": 3.3}}


def status_of(kube: Any) -> dict[str, Any]:
    return (obj(kube, CR, "tiny") or {}).get("status") or {}


def condition(kube: Any, kind: str = "Succeeded") -> dict[str, Any]:
    return next((c for c in status_of(kube).get("conditions") or [] if c["type"] == kind), {})


def progress_line(layer: int) -> str:
    return json.dumps({"event": "progress", "stage": "compress", "layer": layer, "layers": 30, "percent": layer / 30 * 100})


def running() -> dict[str, Any]:
    return {"phase": "Running", "containerStatuses": [{"name": "runner", "state": {"running": {}}}]}


def succeeded() -> dict[str, Any]:
    return {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "state": {"terminated": {
        "exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT),
        "startedAt": "2026-01-01T10:00:00Z", "finishedAt": "2026-01-01T11:00:00Z"}}}]}


def evicted() -> dict[str, Any]:
    return {"phase": "Failed", "reason": "Evicted",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                            "message": "The node was low on resource: memory"}],
            "containerStatuses": [{"name": "runner", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}


def creates(kube: Any, plural: str) -> int:
    return len([r for r in kube._requests if r.method == "POST" and r.url.path.endswith(f"/{plural}")
                and r.headers.get("User-Agent", "").startswith("OpenAPI")])


async def run_started(kube: Any) -> dict[str, Any]:
    await create_secret(kube, "models-s3", S3)
    await create_cr(kube, "tiny", SPEC)
    await eventually(lambda: status_of(kube).get("jobName"))
    job = obj(kube, JOBS, "tiny-runner")
    await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
    return job


@pytest.mark.asyncio
async def test_a_retried_pod_mounts_the_same_scratch_claim_which_goes_with_the_compressionjob(kube, validator) -> None:
    async with operator_running():
        job = await run_started(kube)
        claim = obj(kube, CLAIMS, "tiny-scratch")
        cr = obj(kube, CR, "tiny")
        assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
        assert claim["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
        assert status_of(kube)["scratchClaim"] == "tiny-scratch"

        # The first pod works through 20 layers, then the kubelet evicts it (node memory pressure).
        first = await put_pod(kube, pod_of(job, "zzzzz", running()), log=progress_line(20) + "\n")
        await eventually(lambda: status_of(kube).get("progress", {}).get("layersDone") == 20)
        await put_pod(kube, pod_of(job, "zzzzz", evicted()), log=progress_line(20) + "\n")
        await api(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/tiny-runner-zzzzz")
        await eventually(lambda: condition(kube)["reason"] == "Retrying")
        assert "low on resource: memory" in condition(kube)["message"]
        assert obj(kube, PODS, "tiny-runner-zzzzz") is not None  # kept for its outcome while it is the newest

        # The Job controller makes the next pod from the same template; it resumes at layer 21.
        second = await put_pod(kube, pod_of(job, "aaaaa", running()), log=progress_line(21) + "\n")
        await eventually(lambda: status_of(kube).get("progress", {}).get("layersDone") == 21)
        assert status_of(kube)["phase"] == "Running" and "try 2" in condition(kube)["message"]
        assert claims_of(first) == claims_of(second) == {"tiny-scratch"}
        assert obj(kube, CLAIMS, "tiny-scratch")["metadata"]["uid"] == claim["metadata"]["uid"]
        assert creates(kube, "persistentvolumeclaims") == 1
        # The evicted pod, superseded, is released and goes.
        await eventually(lambda: obj(kube, PODS, "tiny-runner-zzzzz") is None)

        await api(kube, "DELETE", cr_path("tiny"))
        await eventually(lambda: obj(kube, CR, "tiny") is None)
    assert obj(kube, CLAIMS, "tiny-scratch") is None and obj(kube, JOBS, "tiny-runner") is None
    assert OUTCOME_FINALIZER not in (obj(kube, PODS, "tiny-runner-aaaaa") or {"metadata": {}})["metadata"].get("finalizers", [])


@pytest.mark.asyncio
async def test_a_finished_run_whose_job_vanished_while_the_operator_was_down_is_succeeded_not_rerun(kube, validator) -> None:
    async with operator_running():
        job = await run_started(kube)
        await put_pod(kube, pod_of(job, "abcde", running()), log=progress_line(5) + "\n")
        await eventually(lambda: status_of(kube).get("phase") == "Running")
    # While the operator is down the run finishes, and its Job goes (a TTL of 0, or a person): the
    # garbage collector deletes the pod too, which the outcome finalizer holds.
    await put_pod(kube, pod_of(job, "abcde", succeeded()))
    await set_job_status(kube, "tiny-runner", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    await api(kube, "DELETE", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tiny-runner")
    await api(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/tiny-runner-abcde")
    assert obj(kube, PODS, "tiny-runner-abcde")["metadata"]["deletionTimestamp"]
    jobs_before = creates(kube, "jobs")
    async with operator_running() as calls:
        await calls.wait("sync", 2)
        assert status_of(kube)["phase"] == "Succeeded"
        assert status_of(kube)["result"] == {"uri": "s3://models/tiny-w4a16", "originalSizeBytes": 1000,
                                             "compressedSizeBytes": 300, "ratio": 3.3, "metrics": []}
        assert status_of(kube)["completionTime"] == "2026-01-01T11:00:00Z"
        await eventually(lambda: obj(kube, PODS, "tiny-runner-abcde") is None)  # read, then released
        await eventually(lambda: condition(kube, "Reconciling").get("status") == "False")
        await calls.wait("sync", 3)
    assert creates(kube, "jobs") == jobs_before, "a finished run is never started again"
    assert obj(kube, JOBS, "tiny-runner") is None


@pytest.mark.asyncio
async def test_a_ttl_shorter_than_the_sync_interval_keeps_the_success(kube) -> None:
    slow = dataclasses.replace(FAST, sync_interval=1.0)
    async with operator_running(slow) as calls:
        job = await run_started(kube)
        await put_pod(kube, pod_of(job, "abcde", running()))
        await eventually(lambda: status_of(kube).get("phase") == "Running", timeout=5)
        await calls.wait("sync", 1)
        # Within one interval: the pod succeeds, the Job completes, its TTL of 0 deletes both.
        await put_pod(kube, pod_of(job, "abcde", succeeded()))
        await set_job_status(kube, "tiny-runner", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        await api(kube, "DELETE", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tiny-runner")
        await api(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/tiny-runner-abcde")
        await calls.wait("sync", 2)
        assert status_of(kube)["phase"] == "Succeeded" and status_of(kube)["result"]["ratio"] == 3.3


@pytest.mark.asyncio
@pytest.mark.parametrize("delete_on_success", [True, False])
async def test_the_scratch_claim_goes_after_success_only_when_the_spec_says_so(kube, delete_on_success: bool) -> None:
    spec = {**SPEC, "runtime": {**SPEC["runtime"], "scratchVolume": {"deleteOnSuccess": delete_on_success}}}
    await create_secret(kube, "models-s3", S3)
    async with operator_running():
        await create_cr(kube, "tiny", spec)
        await eventually(lambda: status_of(kube).get("jobName"))
        job = obj(kube, JOBS, "tiny-runner")
        await put_pod(kube, pod_of(job, "abcde", succeeded()))
        await set_job_status(kube, "tiny-runner", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: condition(kube, "Reconciling").get("status") == "False")
    assert (obj(kube, CLAIMS, "tiny-scratch") is None) == delete_on_success
    assert ("scratchClaim" in status_of(kube)) != delete_on_success
