"""The few Kubernetes API calls the operator makes, as plain dicts in and out.

Only the key names of Secrets and ConfigMaps are ever returned, never their values, so nothing
secret can leak into status, events or logs from here.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from modelpress.operator.crd import GROUP, PLURAL, VERSION

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


@dataclass(frozen=True)
class Api:
    """The API client, and how long any one call may take: the client's own default is to wait
    forever, and a connection the server dropped without a word would then hold a handler thread."""

    client: client.ApiClient
    timeout: tuple[float, float]  # (connect, read) seconds

    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.client)

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.client)

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.client)


def load_client(timeout: float) -> Api:
    """In-cluster credentials when running in a pod, else the kubeconfig `$KUBECONFIG` names."""
    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api = client.ApiClient(configuration)
    except config.ConfigException:
        api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    return Api(api, (min(timeout, 10.0), timeout))


def _raw(response: Any) -> dict[str, Any]:
    """The object as the server sent it (the client's models reject fields they do not know)."""
    return json.loads(response.data)


def _absent(err: ApiException) -> bool:
    return err.status == 404


def secret_keys(api: Api, namespace: str, name: str) -> set[str] | None:
    """The data keys of a Secret, or None when it does not exist."""
    try:
        secret = api.core().read_namespaced_secret(name, namespace, _request_timeout=api.timeout)
    except ApiException as err:
        if _absent(err):
            return None
        raise
    return set(secret.data or {}) | set(secret.string_data or {})


def configmap_keys(api: Api, namespace: str, name: str) -> set[str] | None:
    """The data keys of a ConfigMap, or None when it does not exist."""
    try:
        configmap = api.core().read_namespaced_config_map(name, namespace, _request_timeout=api.timeout)
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


def _create(api: Api, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create a Job or a PersistentVolumeClaim; when it already exists (a retry, a restart) return
    that one. -> (object, created)"""
    namespace, name, kind = manifest["metadata"]["namespace"], manifest["metadata"]["name"], manifest["kind"]
    try:
        if kind == "Job":
            created = api.batch().create_namespaced_job(namespace, manifest, _preload_content=False, _request_timeout=api.timeout)
        else:
            created = api.core().create_namespaced_persistent_volume_claim(
                namespace, manifest, _preload_content=False, _request_timeout=api.timeout)
        return _raw(created), True
    except ApiException as err:
        if err.status != 409:
            raise
    existing = read_job(api, namespace, name) if kind == "Job" else read_claim(api, namespace, name)
    if existing is None:  # deleted between the two calls; the next retry creates it
        raise RuntimeError(f"{kind} {name} vanished while being adopted")
    return existing, False


def create_job(api: Api, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    return _create(api, manifest)


def create_claim(api: Api, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    return _create(api, manifest)


def read_job(api: Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _raw(api.batch().read_namespaced_job(name, namespace, _preload_content=False, _request_timeout=api.timeout))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def read_claim(api: Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _raw(api.core().read_namespaced_persistent_volume_claim(
            name, namespace, _preload_content=False, _request_timeout=api.timeout))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def delete_claim(api: Api, namespace: str, name: str) -> None:
    """Delete the scratch claim (the volume goes once no pod uses it); an absent claim is done."""
    try:
        api.core().delete_namespaced_persistent_volume_claim(name, namespace, _request_timeout=api.timeout)
    except ApiException as err:
        if not _absent(err):
            raise


def patch_status(api: Api, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """A merge patch of a CompressionJob's status subresource."""
    api.custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}, _request_timeout=api.timeout)


def job_events(api: Api, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The events about a Job (filtered here too: some servers ignore the field selector)."""
    found = _raw(api.core().list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name}", _preload_content=False,
        _request_timeout=api.timeout))["items"]
    return [event for event in found if (event.get("involvedObject") or {}).get("name") == job_name]


def release_pod(api: Api, pod: Mapping[str, Any], finalizer: str) -> None:
    """Take `finalizer` off a pod, so it can go; a pod already gone or already released is done."""
    finalizers = pod["metadata"].get("finalizers") or []
    if finalizer not in finalizers:
        return
    index = finalizers.index(finalizer)
    patch = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
             {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    try:
        api.core().patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], patch,
                                        _preload_content=False, _request_timeout=api.timeout)
    except ApiException as err:
        if not _absent(err):
            raise


def job_pods(api: Api, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The Job's pods (filtered here too: the selector is a hint some servers ignore)."""
    found = _raw(api.core().list_namespaced_pod(
        namespace, label_selector=f"{JOB_NAME_LABELS[0]}={job_name}", _preload_content=False,
        _request_timeout=api.timeout))["items"]
    return [pod for pod in found
            if any((pod["metadata"].get("labels") or {}).get(label) == job_name for label in JOB_NAME_LABELS)]


def log_tail(api: Api, namespace: str, pod: str, container: str, lines: int) -> str:
    """The last lines of a container's log; empty while the container has not started."""
    try:
        # Raw bytes: the client would otherwise parse a log that happens to be one JSON line.
        response = api.core().read_namespaced_pod_log(
            pod, namespace, container=container, tail_lines=lines, _preload_content=False, _request_timeout=api.timeout)
        return response.data.decode("utf-8", errors="replace")
    except ApiException as err:
        if err.status in (400, 404):
            return ""
        raise


def set_job_suspended(api: Api, namespace: str, name: str, suspend: bool) -> None:
    api.batch().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}}, _request_timeout=api.timeout)


def delete_job(api: Api, namespace: str, name: str) -> None:
    """Delete the Job and (through background propagation) its pods; an absent Job is done."""
    try:
        api.batch().delete_namespaced_job(name, namespace, propagation_policy="Background", _request_timeout=api.timeout)
    except ApiException as err:
        if not _absent(err):
            raise


Resource = tuple[str, str, str]  # (group, version, plural)


def read_secret(api: Api, namespace: str, name: str) -> dict[str, Any] | None:
    """The Secret itself (values included, base64): only ever copied into another Secret or decoded for an address."""
    try:
        return _raw(api.core().read_namespaced_secret(name, namespace, _preload_content=False, _request_timeout=api.timeout))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def create_secret(api: Api, manifest: Mapping[str, Any]) -> bool:
    """Create a Secret. -> False when one of its name already exists."""
    try:
        api.core().create_namespaced_secret(manifest["metadata"]["namespace"], manifest, _preload_content=False,
                                            _request_timeout=api.timeout)
    except ApiException as err:
        if err.status != 409:
            raise
        return False
    return True


def patch_secret(api: Api, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
    api.core().patch_namespaced_secret(name, namespace, dict(patch), _preload_content=False, _request_timeout=api.timeout)


def delete_secret(api: Api, namespace: str, name: str) -> None:
    """An absent Secret is done."""
    try:
        api.core().delete_namespaced_secret(name, namespace, _request_timeout=api.timeout)
    except ApiException as err:
        if not _absent(err):
            raise


def read_object(api: Api, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
    group, version, plural = resource
    try:
        return _raw(api.custom().get_namespaced_custom_object(
            group, version, namespace, plural, name, _preload_content=False, _request_timeout=api.timeout))
    except ApiException as err:
        if _absent(err):
            return None
        raise


def create_object(api: Api, resource: Resource, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Create the object; when one of its name exists, return that one (the caller decides whose it is)."""
    group, version, plural = resource
    meta = manifest["metadata"]
    try:
        return _raw(api.custom().create_namespaced_custom_object(
            group, version, meta["namespace"], plural, manifest, _preload_content=False, _request_timeout=api.timeout))
    except ApiException as err:
        if err.status != 409:
            raise
    existing = read_object(api, resource, meta["namespace"], meta["name"])
    if existing is None:
        raise RuntimeError(f"{manifest['kind']} {meta['name']} vanished while being adopted")
    return existing


def delete_object(api: Api, resource: Resource, namespace: str, name: str) -> None:
    """An absent object is done."""
    group, version, plural = resource
    try:
        api.custom().delete_namespaced_custom_object(group, version, namespace, plural, name, _request_timeout=api.timeout)
    except ApiException as err:
        if not _absent(err):
            raise
