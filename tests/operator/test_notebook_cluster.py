"""The notebook's CompressionJob cells (tagged `cluster`) against the emulated API server with the operator
running: they submit the job as a workbench would, and their watch follows it to Succeeded.

The cells need no torch; the ones before them (the model, oneshot) run in the quality tier
(tests/runner/test_notebook.py). Here the Job controller and the kubelet are played by the test.
"""

import asyncio
import base64
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from support.kube import NAMESPACE, api, eventually, obj, operator_running
from support.rbac import TEST_AGENT

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = json.loads((REPO / "examples" / "quickstart.ipynb").read_text())
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_S3_ENDPOINT": "https://s3.example.internal",
           "AWS_S3_BUCKET": "models", "AWS_DEFAULT_REGION": "us-east-1"}
RESULT = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/quickstart-w4a16", "files": 9},
          "sizes": {"originalBytes": 988000000, "compressedBytes": 458000000, "ratio": 2.16}}


def cells(tag: str) -> list[str]:
    return ["".join(c["source"]) for c in NOTEBOOK["cells"] if tag in c.get("metadata", {}).get("tags", [])]


def run(sources: list[str], namespace: dict[str, Any]) -> str:
    """Run notebook cells in order in one namespace, as the kernel would; what they printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for source in sources:
            exec(compile(source, "<notebook cell>", "exec"), namespace)
    return out.getvalue()


def notebook_namespace() -> dict[str, Any]:
    (parameters,) = cells("parameters")
    namespace: dict[str, Any] = {}
    run([parameters], namespace)
    # what the cells before the cluster ones define
    namespace["recipe_args"] = {"scheme": namespace["SCHEME"], "targets": namespace["TARGETS"], "ignore": namespace["IGNORE"]}
    namespace.update(WATCH_INTERVAL_S=0.05, WATCH_TIMEOUT_S=20)
    return namespace


async def runner_finishes(kube: Any, job: str) -> None:
    """The Job controller and the kubelet: a pod that ran the runner, then the Job Complete."""
    await eventually(lambda: obj(kube, "batch/v1/jobs", job))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{job}-x1", "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": job}},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "state": {"terminated": {
               "exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT)}}}]}}
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    await api(kube, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}/status", {"status": {
        "succeeded": 1, "startTime": "2026-01-01T10:00:00Z", "completionTime": "2026-01-01T10:10:00Z",
        "conditions": [{"type": "Complete", "status": "True"}]}})


def test_cluster_cells_are_tagged_and_need_no_torch() -> None:
    sources = cells("cluster")
    assert len(sources) == 4
    assert not any("torch" in s or "transformers" in s for s in sources)


@pytest.mark.asyncio
async def test_notebook_submits_the_job_and_watches_it_to_succeeded(kube: Any) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in S3_KEYS.items()}
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets",
              {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "models-s3", "namespace": NAMESPACE}, "data": encoded})
    namespace = notebook_namespace()
    build, connect, submit, watch = cells("cluster")
    async with operator_running():
        printed = await asyncio.to_thread(run, [build, connect], namespace)
        # The notebook calls as its user, not as the operator: the RBAC check of the operator's role leaves them out.
        namespace["api"].api_client.user_agent = f"{TEST_AGENT} (notebook)"
        printed += await asyncio.to_thread(run, [submit], namespace)
        assert f"submitting to namespace {NAMESPACE}" in printed and "created CompressionJob quickstart-w4a16" in printed
        cr = obj(kube, "modelpress.dev/v1alpha1/compressionjobs", "quickstart-w4a16")
        assert cr["spec"]["recipe"]["modifiers"]["quant_stage"]["quant_modifiers"]["GPTQModifier"] == namespace["recipe_args"]
        assert cr["spec"]["model"]["uri"] == "hf://Qwen/Qwen2-0.5B-Instruct"
        assert cr["spec"]["calibration"]["dataset"] == "hf://HuggingFaceH4/ultrachat_200k"
        finishing = asyncio.create_task(runner_finishes(kube, "quickstart-w4a16-runner"))
        printed = await asyncio.to_thread(run, [watch], namespace)
        await finishing
        again = await asyncio.to_thread(run, [submit], namespace)
    lines = printed.splitlines()
    assert lines[0].startswith("Pending") and all(line.startswith(("Pending", "Running")) for line in lines[:-2])
    assert "Succeeded" in lines[-2] and "Ready=True" in lines[-2] and "Stalled=False" in lines[-2]
    assert lines[-1] == "published s3://models/quickstart-w4a16: 2.16x smaller"
    assert namespace["final_status"]["phase"] == "Succeeded"
    assert "already exists: watching it" in again


def test_without_a_cluster_the_cells_skip_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    namespace = notebook_namespace()
    printed = run(cells("cluster"), namespace)
    assert "No Kubernetes cluster reachable from this kernel" in printed
    assert namespace["api"] is None and namespace["final_status"] is None
    assert "created CompressionJob" not in printed
