"""Whole lifecycles: kopf runs in the test's event loop against the emulated API server."""

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import REGISTRY

from support.kube import (CR, EVENTS, FAST, JOBS, NAMESPACE, api, cr_path, create_cr, create_secret, eventually, obj,
                          operator_running)
from support.crd_schema import problems

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-value",
           "AWS_S3_ENDPOINT": "https://s3.example.internal", "AWS_S3_BUCKET": "models", "AWS_DEFAULT_REGION": "us-east-1"}
HF_SECRET = {"HF_TOKEN": "hf_secret_token_value"}
SECRET_VALUES = [*S3_KEYS.values(), *HF_SECRET.values()]
SECRET_VALUES.remove("models")  # the bucket name is also in the (public) URI
SECRET_VALUES.remove("us-east-1")
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny-llama", "tokenSecret": {"name": "hf-token", "key": "HF_TOKEN"}},
    "recipe": {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64},
    "calibration": {"dataset": "self-generated", "numSamples": 32},
    "output": {"uri": "s3://models/tiny-llama-w4a16", "connection": "models-s3"},
    "runtime": {"resources": {"cpu": "8", "memory": "32Gi", "gpus": 1}},
}
KUEUE = {"kueue.x-k8s.io/queue-name": "gpu-queue", "app.kubernetes.io/instance": "argocd-app"}


def job_of(kube: Any, name: str = "tiny") -> dict[str, Any] | None:
    return obj(kube, JOBS, f"{name}-runner")


def status_of(kube: Any, name: str = "tiny") -> dict[str, Any]:
    return (obj(kube, CR, name) or {}).get("status") or {}


def condition(kube: Any, name: str = "tiny") -> dict[str, Any]:
    return next(c for c in status_of(kube, name)["conditions"] if c["type"] == "Succeeded")


async def set_job_status(kube: Any, name: str, status: dict[str, Any]) -> None:
    await api(kube, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}/status", {"status": status})


async def add_pod(kube: Any, job: str, phase: str, terminated: dict[str, Any] | None = None, log: str = "") -> str:
    """A pod of `job` as the Job controller would make it, with the runner container's state."""
    name = f"{job}-abcde"
    state = {"terminated": terminated} if terminated else ({"running": {}} if phase == "Running" else {"waiting": {"reason": "ContainerCreating"}})
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": job}},
           "status": {"phase": phase, "containerStatuses": [{"name": "runner", "state": state}]}}
    if obj(kube, "v1/pods", name) is None:
        await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    else:
        await api(kube, "PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", {"status": pod["status"]})
    kube.pod_logs[(NAMESPACE, name)] = log
    return name


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def events(kube: Any, reason: str) -> list[dict[str, Any]]:
    found = []
    for (resource, namespace, _), item in kube.objects.items():
        if resource.plural == "events" and not item.deleted and item.raw.get("reason") == reason:
            found.append(item.raw)
    return found


async def preload_secrets(kube: Any) -> None:
    await create_secret(kube, "models-s3", S3_KEYS)
    await create_secret(kube, "hf-token", HF_SECRET)


@pytest.mark.asyncio
async def test_create_runs_progresses_and_succeeds_with_the_result(kube, validator) -> None:
    await preload_secrets(kube)
    succeeded_before = metric("modelpress_compressionjob_phase_total", phase="Succeeded", reason="Succeeded")
    durations_before = metric("modelpress_compressionjob_duration_seconds_count", phase="Succeeded")
    seconds_before = metric("modelpress_compressionjob_duration_seconds_sum", phase="Succeeded")
    async with operator_running() as calls:
        await create_cr(kube, "tiny", SPEC, labels=KUEUE)
        job = await eventually(lambda: job_of(kube))
        cr = obj(kube, CR, "tiny")

        # The manifest: owner, labels, security, resources, env from Secrets by reference only.
        assert job["metadata"]["ownerReferences"] == [{
            "apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "name": "tiny",
            "uid": cr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert "app.kubernetes.io/instance" not in job["metadata"]["labels"]
        pod = job["spec"]["template"]["spec"]
        runner = pod["containers"][0]
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert runner["securityContext"]["allowPrivilegeEscalation"] is False
        assert runner["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert runner["resources"]["limits"]["nvidia.com/gpu"] == "1" == runner["resources"]["requests"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        env = {e["name"]: e for e in runner["env"]}
        assert env["OUTPUT_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "models-s3", "key": "AWS_SECRET_ACCESS_KEY"}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert json.loads(env["MODELPRESS_SPEC"]["value"])["spec"] == cr["spec"]
        assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [2, 3]
        await eventually(lambda: status_of(kube).get("jobName") == "tiny-runner")
        assert status_of(kube)["recipe"] == "W4A16 GPTQ g64"
        await eventually(lambda: events(kube, "JobCreated"))

        # Running, with the runner's progress read from its log.
        progress = {"event": "progress", "stage": "quantize", "layer": 12, "layers": 30, "percent": 41.6, "etaSeconds": 300}
        await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        await add_pod(kube, "tiny-runner", "Running", log="loading\n" + json.dumps(progress) + "\n")
        await eventually(lambda: status_of(kube).get("progress", {}).get("layersDone") == 12)
        status = status_of(kube)
        assert status["phase"] == "Running" and status["progress"] == {
            "stage": "quantize", "percent": 42, "layersDone": 12, "layersTotal": 30,
            "estimatedRemainingSeconds": 300, "lastUpdateTime": status["progress"]["lastUpdateTime"]}
        assert condition(kube)["status"] == "Unknown" and condition(kube)["reason"] == "Running"

        # Done: the termination message becomes the result.
        result = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/tiny-llama-w4a16", "files": 7},
                  "sizes": {"originalBytes": 1000, "compressedBytes": 250, "ratio": 4.0},
                  "metrics": {"perplexityOriginal": 18.0, "perplexityCompressed": 18.9, "gate": {"maxPerplexityIncrease": 5.0, "passed": True}},
                  "durationsS": {"compress": 10.0, "total": 12.5}}
        await add_pod(kube, "tiny-runner", "Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": json.dumps(result)})
        await set_job_status(kube, "tiny-runner", {"active": 0, "succeeded": 1, "startTime": "2026-01-01T10:00:00Z",
                                                   "completionTime": "2026-01-01T10:20:00Z",
                                                   "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: status_of(kube).get("phase") == "Succeeded")
        status = status_of(kube)
        assert status["result"] == {"uri": "s3://models/tiny-llama-w4a16", "originalSizeBytes": 1000, "compressedSizeBytes": 250,
                                    "ratio": 4.0, "durationSeconds": 12.5,
                                    "metrics": [{"name": "perplexityOriginal", "value": 18.0}, {"name": "perplexityCompressed", "value": 18.9},
                                                {"name": "gate.maxPerplexityIncrease", "value": 5.0}]}
        assert status["completionTime"] == "2026-01-01T10:20:00Z" and status["progress"]["percent"] == 100
        assert condition(kube) | {"lastTransitionTime": None} == {
            "type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "the runner finished",
            "observedGeneration": 1, "lastTransitionTime": None}
        assert status["observedGeneration"] == obj(kube, CR, "tiny")["metadata"]["generation"]
        assert problems(validator, obj(kube, CR, "tiny")) == []
        await eventually(lambda: events(kube, "Succeeded"))
        assert metric("modelpress_compressionjob_phase_total", phase="Succeeded", reason="Succeeded") == succeeded_before + 1
        assert metric("modelpress_compressionjob_duration_seconds_count", phase="Succeeded") == durations_before + 1
        assert metric("modelpress_compressionjob_duration_seconds_sum", phase="Succeeded") - seconds_before == 1200

    # The operator never writes spec (the test itself never patched this CR's main endpoint).
    spec_writes = [r for r in kube._requests if r.method == "PATCH" and r.url.path == cr_path("tiny")
                   and ("spec" in r.data if isinstance(r.data, dict) else any(op["path"].startswith("/spec") for op in r.data))]
    assert spec_writes == []
    # No secret value anywhere the operator wrote.
    written = json.dumps([job_of(kube), obj(kube, CR, "tiny"), [e.raw for e in kube.objects.values() if not e.deleted and e.raw.get("kind") == "Event"]])
    for value in SECRET_VALUES:
        assert value not in written


@pytest.mark.asyncio
@pytest.mark.parametrize("job_reason, terminated, expected", [
    ("PodFailurePolicy", {"exitCode": 2, "reason": "Error", "message": json.dumps(
        {"event": "failure", "reason": "InvalidInput", "exitCode": 2, "message": "model: hf://acme/tiny-llama not found"})},
     "InvalidInput"),
    ("PodFailurePolicy", {"exitCode": 3, "reason": "Error", "message": json.dumps(
        {"event": "failure", "reason": "QualityGateFailed", "exitCode": 3, "message": "perplexity rose 14.0%, past 5%"})},
     "QualityGateFailed"),
    ("BackoffLimitExceeded", {"exitCode": 137, "reason": "OOMKilled", "message": ""}, "OOMKilled"),
    ("DeadlineExceeded", None, "DeadlineExceeded"),
    ("BackoffLimitExceeded", {"exitCode": 1, "reason": "Error", "message": "connection reset"}, "BackoffLimitExceeded"),
])
async def test_runner_failure_ends_failed_with_its_reason(kube, validator, job_reason, terminated, expected) -> None:
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: status_of(kube).get("jobName"))
        await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        await add_pod(kube, "tiny-runner", "Running")
        await eventually(lambda: status_of(kube).get("phase") == "Running")
        # FailureTarget alone is not terminal: pods may still be terminating.
        await set_job_status(kube, "tiny-runner", {"conditions": [{"type": "FailureTarget", "status": "True", "reason": job_reason}]})
        if terminated:
            await add_pod(kube, "tiny-runner", "Failed", terminated=terminated)
        await set_job_status(kube, "tiny-runner", {"active": 0, "failed": 1, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": job_reason},
            {"type": "Failed", "status": "True", "reason": job_reason, "message": "Job has reached the specified backoff limit",
             "lastTransitionTime": "2026-01-01T10:05:00Z"}]})
        await eventually(lambda: status_of(kube).get("phase") == "Failed")
        status = status_of(kube)
        assert status["failure"]["reason"] == expected == condition(kube)["reason"]
        assert condition(kube)["status"] == "False" and status["completionTime"] == "2026-01-01T10:05:00Z"
        if terminated and terminated["message"].startswith("{"):
            assert status["failure"]["message"] == json.loads(terminated["message"])["message"]
        elif terminated and terminated["message"]:
            assert status["failure"]["message"] == terminated["message"]
        if terminated:
            assert status["failure"]["exitCode"] == terminated["exitCode"]
        assert problems(validator, obj(kube, CR, "tiny")) == []
        await eventually(lambda: any(e["type"] == "Warning" for e in events(kube, expected)))


@pytest.mark.asyncio
async def test_invalid_spec_fails_at_once_without_a_job(kube) -> None:
    await preload_secrets(kube)
    bad = {**SPEC, "output": {"uri": "s3://models", "connection": "models-s3"}}
    async with operator_running() as calls:
        await create_cr(kube, "tiny", bad)
        await eventually(lambda: status_of(kube).get("phase") == "Failed")
        status = status_of(kube)
        assert status["failure"]["reason"] == "InvalidSpec" and condition(kube)["status"] == "False"
        assert status["failure"]["message"].startswith("spec.output.uri: give a prefix inside the bucket")
        await calls.wait("sync", 2)  # kopf records the handled state once more
        writes = len(kube.objects[CR, NAMESPACE, "tiny", :])
        launches = calls.count["launch"]
        await calls.wait("sync", 10)  # ten syncs later nothing more was written, and nothing retried
        assert calls.count["launch"] == launches
        assert len(kube.objects[CR, NAMESPACE, "tiny", :]) == writes
    assert job_of(kube) is None
    assert len(events(kube, "InvalidSpec")) == 1


@pytest.mark.asyncio
async def test_wrong_secret_key_is_an_invalid_spec(kube) -> None:
    await create_secret(kube, "models-s3", {k: v for k, v in S3_KEYS.items() if k != "AWS_S3_ENDPOINT"})
    await create_secret(kube, "hf-token", HF_SECRET)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: status_of(kube).get("phase") == "Failed")
    assert status_of(kube)["failure"]["message"] == (
        "spec.output.connection: Secret 'models-s3' has no key 'AWS_S3_ENDPOINT'; add it to the Secret")
    assert job_of(kube) is None


@pytest.mark.asyncio
async def test_missing_secret_waits_then_runs_when_it_appears(kube) -> None:
    await create_secret(kube, "hf-token", HF_SECRET)
    async with operator_running() as calls:
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: condition(kube)["reason"] == "WaitingForReference")
        assert status_of(kube)["phase"] == "Pending"
        assert "spec.output.connection: Secret 'models-s3' not found" in condition(kube)["message"]
        await calls.wait("launch", 3)  # three retries later, still waiting and still no Job
        assert condition(kube)["reason"] == "WaitingForReference"
        assert job_of(kube) is None
        await create_secret(kube, "models-s3", S3_KEYS)
        await eventually(lambda: job_of(kube))
        await eventually(lambda: events(kube, "JobCreated"))
        # the sync timer may already have moved JobCreated on to PodPending (a Job, no pod yet)
        await eventually(lambda: condition(kube)["reason"] in ("JobCreated", "PodPending"))


@pytest.mark.asyncio
async def test_restart_adopts_the_job_instead_of_making_a_second(kube) -> None:
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: status_of(kube).get("jobName"))
        await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        await add_pod(kube, "tiny-runner", "Running")
        await eventually(lambda: status_of(kube).get("phase") == "Running")
        # kopf posts events from a queue after the handler returns, and stopping it drops the queue
        await eventually(lambda: events(kube, "Running"))
    job_uid = job_of(kube)["metadata"]["uid"]
    creates = [r for r in kube._requests if r.method == "POST" and "/jobs" in r.url.path]
    async with operator_running() as calls:
        await calls.wait("launch", 1)  # the restarted operator resumes the CompressionJob first
        await set_job_status(kube, "tiny-runner", {"active": 0, "succeeded": 1,
                                                   "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: status_of(kube).get("phase") == "Succeeded")
        await eventually(lambda: events(kube, condition(kube)["reason"]))  # every event before it is posted too
    assert job_of(kube)["metadata"]["uid"] == job_uid
    assert len([r for r in kube._requests if r.method == "POST" and "/jobs" in r.url.path]) <= len(creates) + 1
    assert len(events(kube, "JobCreated")) == 1 and len(events(kube, "Running")) == 1


@pytest.mark.asyncio
async def test_delete_removes_the_job_and_releases_the_resource(kube) -> None:
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: job_of(kube))
        assert obj(kube, CR, "tiny")["metadata"]["finalizers"] == ["modelpress.dev/cleanup"]
        await api(kube, "DELETE", cr_path("tiny"))
        await eventually(lambda: obj(kube, CR, "tiny") is None)
        assert job_of(kube) is None
    deletes = [r for r in kube._requests if r.method == "DELETE" and r.url.path.endswith("/jobs/tiny-runner")]
    assert deletes  # repeated deletes are harmless: an absent Job counts as done
    assert all(d.params.get("propagationPolicy") == "Background" or (d.data or {}).get("propagationPolicy") == "Background"
               for d in deletes)


@pytest.mark.asyncio
async def test_suspend_suspends_and_resumes_the_job(kube) -> None:
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: job_of(kube))
        assert job_of(kube)["spec"]["suspend"] is False
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": True}}})
        await eventually(lambda: job_of(kube)["spec"]["suspend"] is True)
        await eventually(lambda: status_of(kube).get("phase") == "Suspended")
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": False}}})
        await eventually(lambda: job_of(kube)["spec"]["suspend"] is False)
        await eventually(lambda: status_of(kube).get("phase") == "Pending")
        assert condition(kube)["observedGeneration"] == 3


@pytest.mark.asyncio
async def test_a_suspend_that_lands_while_the_job_is_created_still_suspends_it(kube, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's patch arrives between the Job's creation and the status that names it: kopf folds
    it into the creation, where the field handler sees no change, so the sync must carry it."""
    from modelpress.operator import kube as operator_kube

    loop, real = asyncio.get_running_loop(), operator_kube.create_job

    def create_then_suspend(client: Any, manifest: dict[str, Any]) -> Any:
        made = real(client, manifest)
        patch = api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": True}}})
        asyncio.run_coroutine_threadsafe(patch, loop).result(timeout=10)
        return made

    monkeypatch.setattr(operator_kube, "create_job", create_then_suspend)
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: job_of(kube)["spec"]["suspend"] is True)
        await eventually(lambda: status_of(kube).get("phase") == "Suspended")


@pytest.mark.asyncio
async def test_kueue_owns_suspension_and_the_job_shows_queued(kube) -> None:
    await preload_secrets(kube)
    async with operator_running() as calls:
        await create_cr(kube, "tiny", SPEC, labels=KUEUE)
        await eventually(lambda: job_of(kube))
        # Kueue's webhook suspends the Job until the workload is admitted.
        await api(kube, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tiny-runner", {"spec": {"suspend": True}})
        await eventually(lambda: status_of(kube).get("phase") == "Queued")
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": True}}})
        await eventually(lambda: events(kube, "SuspendIgnored"))
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": False}}})
        await eventually(lambda: len(events(kube, "SuspendIgnored")) == 2)
        await calls.wait("sync", 3)
        assert job_of(kube)["spec"]["suspend"] is True  # never unsuspended by the operator


@pytest.mark.asyncio
async def test_job_deleted_underneath_fails_the_run(kube) -> None:
    await preload_secrets(kube)
    async with operator_running():
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: status_of(kube).get("jobName"))
        await api(kube, "DELETE", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tiny-runner")
        await eventually(lambda: status_of(kube).get("phase") == "Failed")
    assert status_of(kube)["failure"]["reason"] == "JobDeleted"
