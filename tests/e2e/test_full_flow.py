"""DESIGN §6 full flow: CR -> operator -> Job manifest -> that container run as a local process against
moto S3 on a tiny model -> the Job marked complete -> the CR Succeeded with the uploaded model's URI and sizes."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelpress.contract import PodPath
from support.kube import CR, JOBS, NAMESPACE, api, create_cr, create_secret, eventually, obj, operator_running
from support.s3 import ACCESS_KEY, SECRET_KEY, s3, s3_endpoint, upload_dir  # noqa: F401  (s3_endpoint is a fixture)


def container_env(kube: Any, container: dict[str, Any], scratch: Path, termination: Path) -> dict[str, str]:
    """The container's env as the kubelet would set it: secretKeyRefs resolved, mounts mapped to local dirs."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"].replace(PodPath.SCRATCH, str(scratch)).replace(PodPath.TERMINATION_LOG, str(termination))
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        data = (obj(kube, "v1/secrets", ref["name"]) or {}).get("data") or {}
        if ref["key"] in data:
            env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        else:
            assert ref.get("optional"), f"{item['name']}: Secret {ref['name']} has no key {ref['key']}"
    return env


@pytest.mark.asyncio
async def test_the_job_the_operator_builds_runs_and_the_result_lands_in_status(
        kube: Any, s3_endpoint: str, llama_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    upload_dir(s3(s3_endpoint), "models", "base/tiny-llama", llama_dir)
    await create_secret(kube, "models-s3", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                            "AWS_S3_ENDPOINT": s3_endpoint, "AWS_S3_BUCKET": "models",
                                            "AWS_DEFAULT_REGION": "us-east-1"})
    spec = {"model": {"uri": "s3://models/base/tiny-llama", "connection": "models-s3"},
            "recipe": {"preset": "W8A8", "algorithm": "RTN"},
            "output": {"uri": "s3://models/tiny-llama-w8a8", "connection": "models-s3"},
            "runtime": {"resources": {"cpu": "2", "memory": "4Gi", "scratch": "1Gi"}}}
    async with operator_running():
        await create_cr(kube, "tiny", spec)
        job = await eventually(lambda: obj(kube, JOBS, "tiny-runner"))
        container = job["spec"]["template"]["spec"]["containers"][0]
        termination = tmp_path / "termination-log"
        env = container_env(kube, container, tmp_path / "scratch", termination)
        command = [sys.executable if part == "python" else part for part in container["command"]]
        done = subprocess.run(command, env={**env, "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert SECRET_KEY not in done.stdout + done.stderr + termination.read_text()

        # The kubelet and the Job controller report what happened; the operator mirrors it.
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "tiny-runner-x1", "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": "tiny-runner"}},
               "status": {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "state": {"terminated": {
                   "exitCode": 0, "reason": "Completed", "message": termination.read_text()}}}]}}
        kube.pod_logs[(NAMESPACE, "tiny-runner-x1")] = done.stdout
        await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
        await api(kube, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tiny-runner/status", {"status": {
            "succeeded": 1, "startTime": "2026-01-01T10:00:00Z", "completionTime": "2026-01-01T10:01:00Z",
            "conditions": [{"type": "Complete", "status": "True"}]}})
        status = await eventually(lambda: obj(kube, CR, "tiny")["status"]["phase"] == "Succeeded" and obj(kube, CR, "tiny")["status"])

    result = status["result"]
    assert result["uri"] == "s3://models/tiny-llama-w8a8"
    assert result["originalSizeBytes"] > result["compressedSizeBytes"] > 0 and result["ratio"] > 1
    listed = s3(s3_endpoint).list_objects_v2(Bucket="models", Prefix="tiny-llama-w8a8/")
    keys = {item["Key"].split("/", 1)[1] for item in listed.get("Contents", [])}
    assert {"config.json", "modelpress-manifest.json"} <= keys
    config = json.loads(s3(s3_endpoint).get_object(Bucket="models", Key="tiny-llama-w8a8/config.json")["Body"].read())
    assert config["quantization_config"]["format"] == "int-quantized"
