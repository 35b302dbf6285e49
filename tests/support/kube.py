"""Fixtures for the operator: a kmock API server (with the project's emulator) and kopf in-process."""

import atexit
import os
import shutil
import tempfile

# kubernetes reads $KUBECONFIG once at import; point it somewhere harmless before anything imports it,
# and leave nothing behind in /tmp when the test process ends.
_KUBE_HOME = tempfile.mkdtemp(prefix="modelpress-kube-")
atexit.register(shutil.rmtree, _KUBE_HOME, ignore_errors=True)
os.environ["KUBECONFIG"] = os.path.join(_KUBE_HOME, "config")

import asyncio
import base64
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from support.crd_schema import crd_validator, problems, with_defaults
from support.kube_emulator import KubeEmulator
from support.rbac import TEST_AGENT, operator_calls, unauthorized
from modelpress.operator.config import OperatorConfig
from modelpress.operator.crd import GROUP, PLURAL, VERSION
from modelpress.operator import handlers

NAMESPACE = "ml"
CR = f"{GROUP}/{VERSION}/{PLURAL}"
JOBS, PODS, SECRETS, CONFIGMAPS, EVENTS = "batch/v1/jobs", "v1/pods", "v1/secrets", "v1/configmaps", "v1/events"
ISVCS, RUNTIMES = "serving.kserve.io/v1beta1/inferenceservices", "serving.kserve.io/v1alpha1/servingruntimes"
TEMPLATES = "template.openshift.io/v1/templates"
CLAIMS = "v1/persistentvolumeclaims"
# api_timeout: stopping kopf cancels the emulator's tasks started while it ran, which can leave a
# handler thread of the stopped operator waiting on a request no one will answer.
FAST = OperatorConfig(runner_image="registry.example/modelpress/runner@sha256:" + "0" * 64,
                      sync_interval=0.1, retry_delay=0.2, metrics_port=0, api_timeout=3.0)


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    """kmock 0.8 ships no built-in resource definitions: declare everything the operator touches."""
    info = kmock.ResourceInfo
    emulator.resources[CR] = info(kind="CompressionJob", singular="compressionjob", namespaced=True,
                                  verbs={"list", "watch", "get", "patch", "create", "delete"},
                                  shortnames={"cjob"}, categories={"modelpress"}, subresources={"status"})
    emulator.resources[JOBS] = info(kind="Job", singular="job", namespaced=True, subresources={"status"},
                                    verbs={"list", "watch", "get", "patch", "create", "delete"})
    for plural, kind in (("pods", "Pod"), ("secrets", "Secret"), ("configmaps", "ConfigMap"), ("events", "Event"),
                         ("persistentvolumeclaims", "PersistentVolumeClaim")):
        emulator.resources[f"v1/{plural}"] = info(kind=kind, singular=kind.lower(), namespaced=True,
                                                  verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources[ISVCS] = info(kind="InferenceService", singular="inferenceservice", namespaced=True,
                                     subresources={"status"}, verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources[RUNTIMES] = info(kind="ServingRuntime", singular="servingruntime", namespaced=True,
                                        verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources[TEMPLATES] = info(kind="Template", singular="template", namespaced=True,
                                         verbs={"list", "watch", "get", "patch", "create", "delete"})
    emulator.resources["v1/namespaces"] = info(kind="Namespace", singular="namespace", namespaced=False,
                                               verbs={"list", "watch", "get"})


@pytest.fixture(scope="session")
def validator() -> Any:
    return crd_validator()


@pytest_asyncio.fixture()
async def kube(validator: Any) -> AsyncIterator[KubeEmulator]:
    """The emulated API server, with a kubeconfig pointing at it. Afterwards, every API call the
    operator made must be one its ClusterRole in deploy/ allows."""
    def check(obj: dict[str, Any]) -> str | None:
        found = problems(validator, obj)
        return "; ".join(found) if found else None

    async with KubeEmulator(cr_validator=check) as emulator, kmock.Server(emulator, user_agent=TEST_AGENT):
        declare_resources(emulator)
        Path(os.environ["KUBECONFIG"]).write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
        }))
        yield emulator
        calls = operator_calls(emulator._requests)
    denied = unauthorized(calls)
    assert not denied, f"deploy/base/rbac.yaml does not allow these calls the operator made: {denied}"


def pod_of(job: dict[str, Any], suffix: str, status: dict[str, Any]) -> dict[str, Any]:
    """A pod of `job` as the Job controller makes it: the template's labels, annotations, finalizers
    and spec, owned by the Job, named `<job>-<suffix>`."""
    template = job["spec"]["template"]
    meta = template.get("metadata") or {}
    pod = {"apiVersion": "v1", "kind": "Pod", "status": status, "spec": template["spec"],
           "metadata": {"name": f"{job['metadata']['name']}-{suffix}", "namespace": job["metadata"]["namespace"],
                        "labels": dict(meta.get("labels") or {}), "annotations": dict(meta.get("annotations") or {}),
                        "finalizers": list(meta.get("finalizers") or []),
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                             "uid": job["metadata"]["uid"], "controller": True}]}}
    return pod


async def put_pod(emulator: KubeEmulator, pod: dict[str, Any], log: str = "") -> dict[str, Any]:
    """Create the pod, or set the status of the one of that name, as the kubelet reports it; serve `log`."""
    meta = pod["metadata"]
    path = f"/api/v1/namespaces/{meta['namespace']}/pods"
    emulator.pod_logs[(meta["namespace"], meta["name"])] = log
    if obj(emulator, PODS, meta["name"], meta["namespace"]) is None:
        return await api(emulator, "POST", path, pod)
    return await api(emulator, "PATCH", f"{path}/{meta['name']}", {"status": pod["status"]})


async def set_job_status(emulator: KubeEmulator, name: str, status: dict[str, Any]) -> None:
    await api(emulator, "PATCH", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}/status", {"status": status})


def claims_of(pod: dict[str, Any]) -> set[str]:
    """The PersistentVolumeClaims a pod mounts, named as Kubernetes names them (a generic ephemeral
    volume's claim is `<pod>-<volume>`, made anew for every pod)."""
    found = set()
    for volume in pod["spec"].get("volumes") or []:
        if "persistentVolumeClaim" in volume:
            found.add(volume["persistentVolumeClaim"]["claimName"])
        elif "ephemeral" in volume:
            found.add(f"{pod['metadata']['name']}-{volume['name']}")
    return found


class Calls:
    """How often each counted handler has run: tests wait for handler runs, not for wall-clock time,
    so "nothing more happens" means "nothing happened over N more runs", on any machine."""

    COUNTED = ("launch", "sync", "suspend")

    def __init__(self) -> None:
        self.count: collections.Counter[str] = collections.Counter()

    def counting(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(**kwargs: Any) -> Any:
            try:
                return fn(**kwargs)
            finally:
                self.count[name] += 1

        return counted

    async def wait(self, name: str, runs: int, timeout: float = 10.0) -> None:
        """Return once `name` has run `runs` more times than now."""
        target = self.count[name] + runs
        await eventually(lambda: self.count[name] >= target, timeout)


@contextlib.asynccontextmanager
async def operator_running(config: OperatorConfig = FAST, namespace: str = NAMESPACE) -> AsyncIterator[Calls]:
    """kopf in this event loop, serving one namespace, until the block ends; yields its handler counts."""
    calls = Calls()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # kmock cannot list namespaces
    ready = asyncio.Event()
    with contextlib.ExitStack() as patches:
        for name in Calls.COUNTED:
            patches.enter_context(mock.patch.object(handlers, name, calls.counting(name, getattr(handlers, name))))
        registry = handlers.register(kopf.OperatorRegistry(), config)
    task = asyncio.create_task(kopf.operator(
        registry=registry, settings=settings, memo=kopf.Memo(config=config),
        standalone=True, namespaces=[namespace], ready_flag=ready))
    await asyncio.wait_for(ready.wait(), timeout=10)
    try:
        yield calls
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            # a shutdown that never ends fails here, named, instead of hanging the tier
            await asyncio.wait_for(task, timeout=30)


async def eventually(probe: Callable[[], Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            value = probe()
        except (KeyError, TypeError, IndexError, AttributeError):
            value = None
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s: {probe.__doc__ or probe}")
        await asyncio.sleep(step)


def obj(emulator: KubeEmulator, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
    """The current state of an object, or None when absent or deleted."""
    key = (kmock.resource(resource), namespace, name)
    found = emulator.objects._objects.get(key)
    return None if found is None or found.deleted else found.raw


async def api(emulator: KubeEmulator, method: str, path: str, body: Any = None) -> Any:
    """One HTTP call to the emulator, as a client would make it; returns the decoded JSON.

    A fresh connection each time: stopping kopf cancels the server's tasks started while it ran,
    which would leave a kept-alive connection without anyone serving it."""
    async with emulator.request(method, path, data=None if body is None else json.dumps(body),
                                headers={"Content-Type": "application/json", "Connection": "close"}) as response:
        payload = await response.json(content_type=None)
        if response.status >= 400:
            raise AssertionError(f"{method} {path} -> {response.status}: {payload}")
        return payload


def cr_path(name: str | None = None, namespace: str = NAMESPACE) -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{base}/{name}" if name else base


async def create_cr(emulator: KubeEmulator, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """POST a CompressionJob with schema defaults applied, as the API server would store it."""
    body = with_defaults({"apiVersion": f"{GROUP}/{VERSION}", "kind": "CompressionJob",
                          "metadata": {"name": name, "namespace": NAMESPACE, **({"labels": labels} if labels else {})},
                          "spec": spec})
    return await api(emulator, "POST", cr_path(), body)


async def create_secret(emulator: KubeEmulator, name: str, data: dict[str, str]) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    await api(emulator, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets",
              {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE}, "data": encoded})
