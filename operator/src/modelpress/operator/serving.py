"""What the operator makes for a CompressionJob that succeeded, built by pure functions of plain dicts.

- `published_connection`: an OpenShift AI S3 connection Secret for the output: the output connection's
  keys with the output's own bucket, the three connection-type annotations and both labels that the
  dashboard and the model controller read, and a description naming the job and its recipe;
- `serving_runtime`: the platform's vLLM ServingRuntime template, made into a runtime of the job's own
  (the image stays the platform's: nothing here names one);
- `inference_service`: a KServe InferenceService for the output, pointed at it by the connection
  annotations (OpenShift AI) or by `storageUri` (plain KServe, and PVC outputs everywhere);
- `serving_state`: what an InferenceService's status says, as `ready`, `url` and a `Serving` condition.

Secret values pass through as the API server gave them (base64), never decoded here.
"""

import base64
import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from modelpress.contract import S3_KEYS, CompressionJob, S3Key, parse_uri
from modelpress.operator.config import ServingPlatform
from modelpress.operator.crd import GROUP
from modelpress.operator.job_builder import LABEL_JOB, owner_reference
from modelpress.operator.status import REASON

ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
RUNTIME = ("serving.kserve.io", "v1alpha1", "servingruntimes")
TEMPLATE = ("template.openshift.io", "v1", "templates")

DASHBOARD = "opendatahub.io/dashboard"
MANAGED = "opendatahub.io/managed"
DISPLAY_NAME = "openshift.io/display-name"
DESCRIPTION = "openshift.io/description"
# Newest first: readers take the newest one present, so every generation of consumer finds the type.
CONNECTION_TYPES = ("opendatahub.io/connection-type-protocol", "opendatahub.io/connection-type-ref",
                    "opendatahub.io/connection-type")
CONNECTIONS = "opendatahub.io/connections"
CONNECTION_PATH = "opendatahub.io/connection-path"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
TEMPLATE_NAME = "opendatahub.io/template-name"
TEMPLATE_DISPLAY_NAME = "opendatahub.io/template-display-name"
API_PROTOCOL = "opendatahub.io/apiProtocol"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "modelpress-operator"
# The CompressionJob an object was made for: a restarted operator adopts only its own objects.
JOB_UID = f"{GROUP}/compressionjob-uid"
MODEL_FORMAT = "vLLM"
MAX_LABEL = 63


def owned_labels(body: Mapping[str, Any]) -> dict[str, str]:
    """Labels of everything made for a job after it succeeded (never Argo CD's tracking label)."""
    return {MANAGED_BY: OPERATOR, "app.kubernetes.io/part-of": "modelpress", LABEL_JOB: body["metadata"]["name"]}


def made_for(obj: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether `obj` was made for this very CompressionJob (not one of the same name before it)."""
    return (obj.get("metadata", {}).get("annotations") or {}).get(JOB_UID) == body["metadata"]["uid"]


def made_by_operator(obj: Mapping[str, Any]) -> bool:
    """Whether `obj` was made by ModelPress at all (a connection an earlier job published may be updated)."""
    return (obj.get("metadata", {}).get("labels") or {}).get(MANAGED_BY) == OPERATOR


def model_name(job: CompressionJob) -> str:
    """The output's last path segment (`s3://models/a/Llama-8B-w4a16` -> `Llama-8B-w4a16`)."""
    uri = parse_uri(job.spec.output.uri)
    return uri.path.rsplit("/", 1)[-1] if uri.path else uri.root


def output_location(job: CompressionJob) -> tuple[str, str]:
    """(bucket or claim, path inside it) of the output."""
    uri = parse_uri(job.spec.output.uri)
    return uri.root, uri.path


def connection_name(body: Mapping[str, Any], job: CompressionJob) -> str | None:
    """The connection that serves the output: the published one, else the output's own (None for PVCs)."""
    publish = job.spec.output.publish_connection
    if publish is not None:
        return publish.name or body["metadata"]["name"]
    return job.spec.output.connection


def describe_job(body: Mapping[str, Any], job: CompressionJob, recipe: str) -> str:
    meta = body["metadata"]
    return f"{recipe} of {job.spec.model.uri}, compressed by CompressionJob {meta['namespace']}/{meta['name']}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def published_connection(body: Mapping[str, Any], job: CompressionJob, source_data: Mapping[str, str],
                         recipe: str) -> dict[str, Any]:
    """The connection Secret for the output; `source_data` is the output connection's `data` (base64)."""
    publish = job.spec.output.publish_connection
    assert publish is not None, "only for jobs with spec.output.publishConnection"
    bucket, _ = output_location(job)
    data = {key: source_data[key] for key in S3_KEYS if key in source_data and key != S3Key.BUCKET}
    data[S3Key.BUCKET] = _b64(bucket)
    meta: dict[str, Any] = {
        "name": connection_name(body, job),
        "namespace": body["metadata"]["namespace"],
        "labels": {DASHBOARD: "true", MANAGED: "true", **owned_labels(body)},
        "annotations": {
            DISPLAY_NAME: publish.display_name or model_name(job),
            DESCRIPTION: describe_job(body, job, recipe),
            **{key: "s3" for key in CONNECTION_TYPES},
            JOB_UID: body["metadata"]["uid"],
        },
    }
    if publish.delete_with_job:
        meta["ownerReferences"] = [owner_reference(body)]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "data": data}


def isvc_name(body: Mapping[str, Any], job: CompressionJob) -> str:
    """spec.serve.name, else the job's name as a DNS-1035 label (dots to dashes, hashed when too long)."""
    assert job.spec.serve is not None
    if job.spec.serve.name:
        return job.spec.serve.name
    name = body["metadata"]["name"].replace(".", "-")
    if not name[0].isalpha():
        name = f"m-{name}"
    if len(name) <= MAX_LABEL:
        return name
    digest = hashlib.sha256(body["metadata"]["name"].encode()).hexdigest()[:8]
    return f"{name[:MAX_LABEL - len(digest) - 1].rstrip('-')}-{digest}"


def _substitute(node: Any, values: Mapping[str, str]) -> Any:
    """A Template's `${NAME}` parameters filled in, as `oc process` does for those with a value."""
    if isinstance(node, str):
        return re.sub(r"\$\{([A-Za-z0-9_]+)\}", lambda m: values.get(m.group(1), m.group(0)), node)
    if isinstance(node, list):
        return [_substitute(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _substitute(value, values) for key, value in node.items()}
    return node


class TemplateUnusable(ValueError):
    """The platform's runtime template holds no ServingRuntime."""


def serving_runtime(template: Mapping[str, Any], name: str, body: Mapping[str, Any], owned: bool) -> dict[str, Any]:
    """A ServingRuntime named `name` in the job's namespace, made from an OpenShift Template of one.

    It carries the template's name and display name as the dashboard records them, so the dashboard
    shows and edits the deployment as one of its own.
    """
    runtimes = [o for o in template.get("objects") or [] if isinstance(o, dict) and o.get("kind") == "ServingRuntime"]
    template_meta = template.get("metadata") or {}
    if not runtimes:
        raise TemplateUnusable(f"Template {template_meta.get('namespace')}/{template_meta.get('name')} holds no ServingRuntime")
    values = {p["name"]: str(p["value"]) for p in template.get("parameters") or [] if p.get("name") and "value" in p}
    runtime = _substitute(copy.deepcopy(runtimes[0]), values)
    own_meta = runtime.get("metadata") or {}
    template_annotations = template_meta.get("annotations") or {}
    annotations = {**(own_meta.get("annotations") or {}), TEMPLATE_NAME: template_meta.get("name", ""),
                   JOB_UID: body["metadata"]["uid"]}
    display = template_annotations.get(DISPLAY_NAME) or (own_meta.get("annotations") or {}).get(DISPLAY_NAME)
    if display:
        annotations[TEMPLATE_DISPLAY_NAME] = display
    if API_PROTOCOL in template_annotations:
        annotations.setdefault(API_PROTOCOL, template_annotations[API_PROTOCOL])
    meta: dict[str, Any] = {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": {**(own_meta.get("labels") or {}), DASHBOARD: "true", **owned_labels(body)},
        "annotations": annotations,
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(body)]
    runtime["metadata"] = meta
    runtime.setdefault("apiVersion", "/".join(RUNTIME[:2]))
    return runtime


def _resources(job: CompressionJob) -> dict[str, Any]:
    assert job.spec.serve is not None
    res = job.spec.serve.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpus:
        requests[res.gpu_resource] = limits[res.gpu_resource] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def inference_service(body: Mapping[str, Any], job: CompressionJob, platform: ServingPlatform, runtime: str | None,
                      connection: str | None) -> dict[str, Any]:
    """The InferenceService for the output: vLLM format, the spec's resources and arguments, RawDeployment by default.

    On OpenShift AI an S3 output is reached through `connection` (its webhook fills in the storage);
    on plain KServe, and for PVC outputs, through `storageUri`.
    """
    serve = job.spec.serve
    assert serve is not None
    uri = parse_uri(job.spec.output.uri)
    annotations = {DISPLAY_NAME: model_name(job), DEPLOYMENT_MODE: serve.deployment_mode, JOB_UID: body["metadata"]["uid"]}
    model: dict[str, Any] = {"modelFormat": {"name": MODEL_FORMAT}, "resources": _resources(job)}
    if runtime:
        model["runtime"] = runtime
    if serve.args:
        model["args"] = list(serve.args)
    if uri.scheme == "s3" and platform == "openshift-ai":
        assert connection is not None, "an S3 output on OpenShift AI is served through a connection"
        annotations[CONNECTIONS] = connection
        annotations[CONNECTION_PATH] = uri.path
    else:
        model["storageUri"] = f"{uri.scheme}://{uri.root}/{uri.path}"
    predictor: dict[str, Any] = {"minReplicas": serve.replicas, "maxReplicas": serve.replicas, "model": model}
    if serve.service_account_name:
        predictor["serviceAccountName"] = serve.service_account_name
    if serve.resources.gpus:
        predictor["tolerations"] = [{"key": serve.resources.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    meta: dict[str, Any] = {
        "name": isvc_name(body, job),
        "namespace": body["metadata"]["namespace"],
        "labels": {DASHBOARD: "true", **owned_labels(body)},
        "annotations": annotations,
    }
    if serve.delete_with_job:
        meta["ownerReferences"] = [owner_reference(body)]
    return {"apiVersion": "/".join(ISVC[:2]), "kind": "InferenceService", "metadata": meta, "spec": {"predictor": predictor}}


@dataclass(frozen=True)
class ServingState:
    """An InferenceService's state as the CompressionJob shows it."""

    ready: bool
    url: str | None
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


def _reason(text: Any, fallback: str) -> str:
    return text if isinstance(text, str) and len(text) <= 1024 and re.match(REASON, text) else fallback


def serving_state(isvc: Mapping[str, Any] | None, name: str) -> ServingState:
    """Ready (True), failed (False, KServe's own reason), or on its way (Unknown); a deleted one is False."""
    if isvc is None:
        return ServingState(False, None, "False", "InferenceServiceDeleted",
                            f"InferenceService {name} was deleted; create a new CompressionJob to serve the model again")
    status = isvc.get("status") or {}
    url = status.get("url") or (status.get("address") or {}).get("url")
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("status") == "True":
        return ServingState(True, url, "True", "Ready", f"InferenceService {name} is ready at {url}" if url else f"InferenceService {name} is ready")
    model_status = status.get("modelStatus") or {}
    failure = model_status.get("lastFailureInfo") or {}
    active = (model_status.get("states") or {}).get("activeModelState")
    if failure or model_status.get("transitionStatus") in FAILED_TRANSITIONS or active == "FailedToLoad":
        reason = _reason(failure.get("reason") or model_status.get("transitionStatus") or active, "ServingFailed")
        message = failure.get("message") or ready.get("message") or f"InferenceService {name}: {reason}"
        return ServingState(False, url, "False", reason, str(message)[:32768])
    message = ready.get("message") or f"waiting for InferenceService {name} to become ready"
    return ServingState(False, url, "Unknown", "Deploying", str(message)[:32768])
