"""The few Kubernetes API calls the operator makes, as plain dicts in and out.

Only the key names of Secrets and ConfigMaps are ever returned, never their values, so nothing
secret can leak into status, events or logs from here.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from modelpress.operator.crd import GROUP, PLURAL, VERSION

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def load_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig `$KUBECONFIG` names."""
    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


def _raw(response: Any) -> dict[str, Any]:
    """The object as the server sent it (the client's models reject fields they do not know)."""
    return json.loads(response.data)


def _absent(err: ApiException) -> bool:
    return err.status == 404


def secret_keys(api: client.ApiClient, namespace: str, name: str) -> set[str] | None:
    """The data keys of a Secret, or None when it does not exist."""
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as err:
        if _absent(err):
            return None
        raise
    return set(secret.data or {}) | set(secret.string_data or {})


def configmap_keys(api: client.ApiClient, namespace: str, name: str) -> set[str] | None:
    """The data keys of a ConfigMap, or None when it does not exist."""
    try:
        configmap = client.CoreV1Api(api).read_namespaced_config_map(name, namespace)
    except ApiException as err:
        if _absent(err):
            return None
        raise
    return set(configmap.data or {}) | set(configmap.binary_data or {})


def error_message(err: ApiException) -> str:
    """The API server's own words for a refused call (its Status message), else the HTTP reason."""
    try:
        return str(json.loads(err.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(err.reason or err.status)


def _create(api: client.ApiClient, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create a Job or a PersistentVolumeClaim; when it already exists (a retry, a restart) return
    that one. -> (object, created)"""
    namespace, name, kind = manifest["metadata"]["namespace"], manifest["metadata"]["name"], manifest["kind"]
    try:
        if kind == "Job":
            created = client.BatchV1Api(api).create_namespaced_job(namespace, manifest, _preload_content=False)
        else:
            created = client.CoreV1Api(api).create_namespaced_persistent_volume_claim(namespace, manifest, _preload_content=False)
        return _raw(created), True
    except ApiException as err:
        if err.status != 409:
            raise
    existing = read_job(api, namespace, name) if kind == "Job" else read_claim(api, namespace, name)
    if existing is None:  # deleted between the two calls; the next retry creates it
        raise RuntimeError(f"{kind} {name} vanished while being adopted")
    return existing, False


def create_job(api: client.ApiClient, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    return _create(api, manifest)


def create_claim(api: client.ApiClient, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    return _create(api, manifest)


def read_job(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _raw(client.BatchV1Api(api).read_namespaced_job(name, namespace, _preload_content=False))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def read_claim(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _raw(client.CoreV1Api(api).read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def delete_claim(api: client.ApiClient, namespace: str, name: str) -> None:
    """Delete the scratch claim (the volume goes once no pod uses it); an absent claim is done."""
    try:
        client.CoreV1Api(api).delete_namespaced_persistent_volume_claim(name, namespace)
    except ApiException as err:
        if not _absent(err):
            raise


def patch_status(api: client.ApiClient, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """A merge patch of a CompressionJob's status subresource."""
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)})


def job_events(api: client.ApiClient, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The events about a Job (filtered here too: some servers ignore the field selector)."""
    found = _raw(client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name}", _preload_content=False))["items"]
    return [event for event in found if (event.get("involvedObject") or {}).get("name") == job_name]


def release_pod(api: client.ApiClient, pod: Mapping[str, Any], finalizer: str) -> None:
    """Take `finalizer` off a pod, so it can go; a pod already gone or already released is done."""
    finalizers = pod["metadata"].get("finalizers") or []
    if finalizer not in finalizers:
        return
    index = finalizers.index(finalizer)
    patch = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
             {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    try:
        client.CoreV1Api(api).patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], patch, _preload_content=False)
    except ApiException as err:
        if not _absent(err):
            raise


def job_pods(api: client.ApiClient, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The Job's pods (filtered here too: the selector is a hint some servers ignore)."""
    found = _raw(client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"{JOB_NAME_LABELS[0]}={job_name}", _preload_content=False))["items"]
    return [pod for pod in found
            if any((pod["metadata"].get("labels") or {}).get(label) == job_name for label in JOB_NAME_LABELS)]


def log_tail(api: client.ApiClient, namespace: str, pod: str, container: str, lines: int) -> str:
    """The last lines of a container's log; empty while the container has not started."""
    try:
        # Raw bytes: the client would otherwise parse a log that happens to be one JSON line.
        response = client.CoreV1Api(api).read_namespaced_pod_log(
            pod, namespace, container=container, tail_lines=lines, _preload_content=False)
        return response.data.decode("utf-8", errors="replace")
    except ApiException as err:
        if err.status in (400, 404):
            return ""
        raise


def set_job_suspended(api: client.ApiClient, namespace: str, name: str, suspend: bool) -> None:
    client.BatchV1Api(api).patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})


def delete_job(api: client.ApiClient, namespace: str, name: str) -> None:
    """Delete the Job and (through background propagation) its pods; an absent Job is done."""
    try:
        client.BatchV1Api(api).delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as err:
        if not _absent(err):
            raise
