"""A kmock 0.8 Kubernetes emulator with the API-server behaviour the operator relies on.

Stock kmock stores objects as plain JSON and misses what kopf needs to run (uids, resource
versions, generations, the status subresource, 422 on a failed JSON-patch test). This subclass
adds them, serves pod logs from `pod_logs`, validates ModelPress's own objects against the
CRD schema on every write and every created object's names and labels, answering 422 as a real
API server would, lists objects in name order as etcd does, and refuses creates on request
(`refuse`), as a quota or an admission webhook would.
"""

import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, rendering

from support.k8s_names import job_with_server_labels, object_problems

CRD_PLURAL = "compressionjobs"


@attrs.define
class Refusal:
    """Answer creates of `plural` with `error`, `times` times (None: until removed)."""

    plural: str
    error: kmock.KubernetesError
    times: int | None = None


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock plus uid/resourceVersion/generation stamping, status separation and pod logs."""

    # Checks a CompressionJob as it would be stored; returns the problem, or None when valid.
    cr_validator: Callable[[dict[str, Any]], str | None] | None = None
    # (namespace, pod name) -> the pod's log text, served at .../pods/<name>/log.
    pod_logs: dict[tuple[str, str], str] = attrs.field(factory=dict)
    refusals: list[Refusal] = attrs.field(factory=list)
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _current_version: int = attrs.field(default=0, init=False)

    def _next_version(self) -> str:
        self._current_version = next(self._versions)
        return str(self._current_version)

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in self.resources[resource].subresources if resource in self.resources else False

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        if request.action == enums.action.FETCH and request.subresource == "log":
            return self._serve_log(request)
        if request.action == enums.action.CREATE:
            self._refuse_if_asked(request)
            request = self._replace(request, self._stamped(request))
            if problems := object_problems(request.data):
                raise kmock.KubernetesError(status=422, reason="Invalid", message="; ".join(problems))
        elif request.action == enums.action.UPDATE and request.name is not None:
            request = self._replace(request, self._versioned_patch(request))
        elif request.action == enums.action.DELETE and request.name is not None:
            current = self._current(request)
            if current is not None:
                current.patch({"metadata": {"resourceVersion": self._next_version()}})
        try:
            self._validate_prospective(request)
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None

    def refuse(self, plural: str, status: int, reason: str, message: str, times: int | None = None) -> Refusal:
        """Refuse creates of `plural` as the API server would (a quota, an admission webhook)."""
        refusal = Refusal(plural, kmock.KubernetesError(status=status, reason=reason, message=message), times)
        self.refusals.append(refusal)
        return refusal

    def _refuse_if_asked(self, request: rendering.Request) -> None:
        for refusal in self.refusals:
            if refusal.plural == request.resource.plural and refusal.times != 0:
                if refusal.times is not None:
                    refusal.times -= 1
                raise refusal.error

    def _replace(self, request: rendering.Request, data: Any) -> rendering.Request:
        """The request with new data; kmock matches reactions against its own list of requests."""
        changed = attrs.evolve(request, data=data)
        self._requests[self._requests.index(request)] = changed
        return changed

    def _current(self, request: rendering.Request) -> kmock.Object | None:
        key = (request.resource, request.namespace, request.name)
        obj = self.objects._objects.get(key)  # indexing creates no entry; `in` is unreliable (kmock quirk)
        return None if obj is None or obj.deleted else obj

    def _stamped(self, request: rendering.Request) -> dict[str, Any]:
        data = dict(request.data)
        meta = dict(data.get("metadata", {}))
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_version()
        if request.namespace and "namespace" not in meta:
            meta["namespace"] = request.namespace
        data["metadata"] = meta
        if self._has_status(request.resource):
            data.pop("status", None)
        return job_with_server_labels(data) if data.get("kind") == "Job" else data

    def _versioned_patch(self, request: rendering.Request) -> Any:
        """Restrict the patch to its endpoint's part, bump generation on spec changes, bump the version."""
        to_status = request.subresource == "status"
        separate = self._has_status(request.resource)
        current = self._current(request)
        version = self._next_version()
        if isinstance(request.data, list):
            ops = [op for op in request.data if not separate or op["path"].startswith("/status") == to_status]
            ops.append({"op": "replace", "path": "/metadata/resourceVersion", "value": version})
            if current is not None and not to_status and any(op["path"].startswith("/spec") for op in ops):
                ops.append({"op": "replace", "path": "/metadata/generation", "value": current["metadata"].get("generation", 1) + 1})
            return ops
        patch = dict(request.data)
        if separate and to_status:
            patch = {"status": patch["status"]} if "status" in patch else {}
        elif separate:
            patch.pop("status", None)
        meta = dict(patch.get("metadata") or {})
        meta["resourceVersion"] = version
        if current is not None and "spec" in patch and not to_status:
            new = kmock.Object(dict(current.raw))
            new.patch({"spec": patch["spec"]})
            if new.raw.get("spec") != current.raw.get("spec"):
                meta["generation"] = current["metadata"].get("generation", 1) + 1
        patch["metadata"] = meta
        return patch

    def _validate_prospective(self, request: rendering.Request) -> None:
        """Reject an invalid CompressionJob before it is stored, as the API server's schema check does."""
        if self.cr_validator is None or request.resource.plural != CRD_PLURAL:
            return
        if request.action == enums.action.CREATE:
            prospective = request.data
        elif request.action == enums.action.UPDATE and (current := self._current(request)) is not None:
            if isinstance(request.data, list):
                prospective = jsonpatch.apply_patch(current.raw, request.data, in_place=False)
            else:
                new = kmock.Object(dict(current.raw))
                new.patch(request.data)
                prospective = new.raw
        else:
            return
        problem = self.cr_validator(prospective)
        if problem is not None:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=problem)

    def _serve_log(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        text = self.pod_logs.get((request.namespace, request.name))
        if text is None:
            raise kmock.KubernetesObjectNotFoundError()
        tail = request.params.get("tailLines")
        lines = text.splitlines(keepends=True)
        return aiohttp.web.Response(text="".join(lines[-int(tail):] if tail else lines))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listing = dict(await super()._serve_list(request))
        listing["metadata"] = {"resourceVersion": str(self._current_version)}
        listing["items"] = sorted(listing["items"], key=lambda item: (item["metadata"].get("namespace") or "", item["metadata"]["name"]))
        return listing

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        since = int(request.params.get("resourceVersion") or 0)
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED" and since:
                if int(event["object"].get("metadata", {}).get("resourceVersion", 0)) <= since:
                    continue
            yield event
