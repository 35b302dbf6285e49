"""Helpers for the tests of what the operator does after a job succeeded: a job run to success, its status."""

import base64
import dataclasses
import json
from typing import Any

from support.kube import CR, FAST, JOBS, NAMESPACE, TEMPLATES, api, create_secret, eventually, obj

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-value",
           "AWS_S3_ENDPOINT": "https://s3.example.internal:9000", "AWS_S3_BUCKET": "scratch-bucket",
           "AWS_DEFAULT_REGION": "eu-west-1"}
SPEC: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny-llama", "revision": "main"},
    "recipe": {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64},
    "calibration": {"dataset": "self-generated", "numSamples": 32},
    "output": {"uri": "s3://models/compressed/tiny-llama-w4a16", "connection": "models-s3"},
}
RESULT = {"event": "result", "status": "Succeeded", "output": {"uri": "s3://models/compressed/tiny-llama-w4a16"},
          "sizes": {"originalBytes": 4000, "compressedBytes": 1000, "ratio": 4.0},
          "metrics": {"perplexityOriginal": 18.0, "perplexityCompressed": 18.9, "perplexityIncreasePercent": 5.0},
          "durationsS": {"total": 12.5}}
TEMPLATE_NAMESPACE = "redhat-ods-applications"
RUNTIME_IMAGE = "registry.example/rhoai/vllm-cuda@sha256:" + "1" * 64
# The platform's template as OpenShift AI ships it (trimmed): one ServingRuntime, the image a parameter.
TEMPLATE = {
    "apiVersion": "template.openshift.io/v1", "kind": "Template",
    "metadata": {"name": "vllm-cuda-runtime-template", "namespace": TEMPLATE_NAMESPACE,
                 "labels": {"opendatahub.io/dashboard": "true"},
                 "annotations": {"openshift.io/display-name": "vLLM NVIDIA GPU ServingRuntime for KServe",
                                 "opendatahub.io/apiProtocol": "REST"}},
    "parameters": [{"name": "VLLM_IMAGE", "value": RUNTIME_IMAGE}],
    "objects": [{
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": "vllm-cuda-runtime", "labels": {"opendatahub.io/dashboard": "true"},
                     "annotations": {"openshift.io/display-name": "vLLM NVIDIA GPU ServingRuntime for KServe"}},
        "spec": {"multiModel": False, "supportedModelFormats": [{"name": "vLLM", "autoSelect": True}],
                 "containers": [{"name": "kserve-container", "image": "${VLLM_IMAGE}",
                                 "args": ["--port=8080", "--model=/mnt/models", "--served-model-name={{.Name}}"]}]},
    }],
}
DELIVERY = dataclasses.replace(FAST, registry_retry_delay=0.2, registry_retry_max=0.4, registry_timeout=2.0)


def status_of(kube: Any, name: str = "tiny") -> dict[str, Any]:
    return (obj(kube, CR, name) or {}).get("status") or {}


def condition(kube: Any, kind: str, name: str = "tiny") -> dict[str, Any]:
    return next((c for c in status_of(kube, name).get("conditions") or [] if c["type"] == kind), {})


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}


async def preload(kube: Any, template: bool = True) -> None:
    """The output connection and, on OpenShift AI, the platform's vLLM runtime template."""
    await create_secret(kube, "models-s3", S3_KEYS)
    if template:
        await api(kube, "POST", f"/apis/template.openshift.io/v1/namespaces/{TEMPLATE_NAMESPACE}/templates", TEMPLATE)
        assert obj(kube, TEMPLATES, TEMPLATE["metadata"]["name"], TEMPLATE_NAMESPACE)


async def succeed(kube: Any, name: str = "tiny", result: dict[str, Any] = RESULT) -> None:
    """Run the CompressionJob's Job to success, with the runner's result as its termination message."""
    job = f"{name}-runner"
    await eventually(lambda: obj(kube, JOBS, job))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{job}-abcde", "namespace": NAMESPACE, "labels": {"batch.kubernetes.io/job-name": job}},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "state": {"terminated": {
               "exitCode": 0, "reason": "Completed", "message": json.dumps(result)}}}]}}
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    kube.pod_logs[(NAMESPACE, f"{job}-abcde")] = ""
    await api(kube, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}/status", {"status": {
        "succeeded": 1, "startTime": "2026-01-01T10:00:00Z", "completionTime": "2026-01-01T10:20:00Z",
        "conditions": [{"type": "Complete", "status": "True"}]}})
    await eventually(lambda: status_of(kube, name).get("phase") == "Succeeded")


async def set_isvc_status(kube: Any, name: str, status: dict[str, Any]) -> None:
    """What KServe writes on the InferenceService as it deploys it."""
    await api(kube, "PATCH", f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices/{name}/status",
              {"status": status})
