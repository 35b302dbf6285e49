"""The ClusterRole in deploy/ against the calls the operator makes: every kmock test already fails on
a call the role does not allow (see the `kube` fixture); here one tour through every handler shows
that the role grants nothing the operator does not use, but for the few grants named below; a
second job, run to success, publishes its connection over one ModelPress wrote before, is served
on OpenShift AI from the platform's template, and takes both along when deleted."""

import json
from typing import Any

import pytest

from support.delivery import DELIVERY, preload, status_of, succeed
from support.kube import (CLAIMS, CR, ISVCS, JOBS, NAMESPACE, PODS, SECRETS, api, cr_path, create_cr, eventually,
                          obj, operator_running, pod_of, put_pod, set_job_status)
from support.rbac import grants, operator_calls, operator_rules

# Grants no test can exercise, and why they are there.
UNEXERCISED = {
    ("modelpress.dev", "compressionjobs/finalizers", "update"):
        "OpenShift requires it before a child may set blockOwnerDeletion on its CompressionJob owner",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf's cluster-wide scan (off in the tests)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf's cluster-wide scan (off in the tests)",
    ("", "namespaces", "list"): "kopf's cluster-wide scan (off in the tests)",
    ("", "namespaces", "watch"): "kopf's cluster-wide scan (off in the tests)",
}
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny-llama"},
    "recipe": {"configMap": {"name": "recipes", "key": "rtn.yaml"}},
    "output": {"uri": "s3://models/tiny", "connection": "models-s3"},
}


async def create_configmap(kube: Any, name: str, data: dict[str, str]) -> None:
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps",
              {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NAMESPACE}, "data": data})


@pytest.mark.asyncio
async def test_the_role_grants_only_what_the_operator_uses(kube) -> None:
    await preload(kube)
    await create_configmap(kube, "recipes", {"rtn.yaml": "quant_stage: {}"})
    await create_configmap(kube, "odh-trusted-ca-bundle", {"ca-bundle.crt": "ROOTS"})
    earlier = {"apiVersion": "v1", "kind": "Secret", "data": {},
               "metadata": {"name": "shared", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/managed-by": "modelpress-operator"}}}
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", earlier)
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", SPEC)
        await eventually(lambda: (obj(kube, CR, "tiny").get("status") or {}).get("jobName"))
        job = obj(kube, JOBS, "tiny-runner")
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": True}}})
        await eventually(lambda: obj(kube, JOBS, "tiny-runner")["spec"]["suspend"] is True)
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": False}}})
        await set_job_status(kube, "tiny-runner", {"active": 1, "startTime": "2026-01-01T10:00:00Z"})
        evicted = {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True"}],
                   "containerStatuses": [{"name": "runner", "state": {"terminated": {"exitCode": 143}}}]}
        await put_pod(kube, pod_of(job, "zzzzz", evicted))
        await eventually(lambda: obj(kube, CR, "tiny")["status"]["phase"] == "Pending" and
                         obj(kube, CR, "tiny")["status"]["conditions"][0]["reason"] == "Retrying")
        await put_pod(kube, pod_of(job, "aaaaa", {"phase": "Running", "containerStatuses": [{"name": "runner", "state": {"running": {}}}]}),
                      log=json.dumps({"event": "progress", "stage": "compress", "layer": 1, "layers": 2, "percent": 50}) + "\n")
        await eventually(lambda: released(obj(kube, PODS, "tiny-runner-zzzzz")))
        await api(kube, "DELETE", cr_path("tiny"))
        await eventually(lambda: obj(kube, CR, "tiny") is None)
        assert obj(kube, CLAIMS, "tiny-scratch") is None
        served = {**SPEC, "output": {**SPEC["output"], "publishConnection": {"name": "shared", "deleteWithJob": True}},
                  "serve": {"deleteWithJob": True}}
        await create_cr(kube, "served", served)
        await succeed(kube, "served")
        await eventually(lambda: status_of(kube, "served").get("serving", {}).get("name"))
        await api(kube, "DELETE", cr_path("served"))
        await eventually(lambda: obj(kube, CR, "served") is None)
        assert obj(kube, SECRETS, "shared") is None and obj(kube, ISVCS, "served") is None
    used = operator_calls(kube._requests)
    granted = grants(operator_rules())
    assert set(UNEXERCISED) <= granted
    assert sorted(granted - used - set(UNEXERCISED)) == [], "granted but never used"
    assert sorted(used - granted) == []


def released(pod: dict[str, Any] | None) -> bool:
    """The pod no longer carries the operator's outcome finalizer."""
    return pod is not None and not pod["metadata"].get("finalizers")
