"""After a CompressionJob succeeds: publish a connection for the output, serve it, register it.

One timer per CompressionJob walks the steps its spec asks for, each reported in status with its
own condition (`Published`, `Serving`, `Registered`), so none of them can turn the compression
result into a failure: the job stays `Succeeded`. Publishing and creating the InferenceService
happen once; from then on the InferenceService is read every interval and its readiness and URL
mirrored into `status.serving`. Registering is retried with a doubling delay while the registry
is unreachable or refuses the token, each attempt reported with the time of the next.

Nothing made here belongs to the CompressionJob unless the spec asks (`deleteWithJob`): once the
job is done, the connection and the served model are the user's.
"""

import asyncio
import base64
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from modelpress.contract import CompressionJob, S3Key, parse_uri
from modelpress.operator import kube, serving
from modelpress.operator.config import OperatorConfig
from modelpress.operator.crd import GROUP, PLURAL, VERSION
from modelpress.operator.job_builder import recipe_summary
from modelpress.operator.registry import RegistryRefused, RegistryRetry, error_message, register_version, registration
from modelpress.operator.status import Condition, now, set_condition
from modelpress.operator.validation import SpecRejected, parse

RESOURCE = (GROUP, VERSION, PLURAL)
PUBLISHED, SERVING, REGISTERED = "Published", "Serving", "Registered"
# Registration outcomes no retry can change: only a new CompressionJob (another version name) can.
FINAL_REGISTRY_REASONS = ("VersionExists", "RegistryRefused")


# --- the steps ---------------------------------------------------------------------------------------------


def write_connection(api: kube.Api, manifest: Mapping[str, Any]) -> str:
    """Create the connection, or update one ModelPress wrote before. -> "created", "updated" or "taken"."""
    meta = manifest["metadata"]
    if kube.create_secret(api, manifest):
        return "created"
    existing = kube.read_secret(api, meta["namespace"], meta["name"])
    if existing is None or not serving.made_by_operator(existing):
        return "taken"
    kube.patch_secret(api, meta["namespace"], meta["name"], {"metadata": {
        "labels": meta["labels"], "annotations": meta["annotations"], "ownerReferences": meta.get("ownerReferences")},
        "data": manifest["data"]})
    return "updated"


def decoded(secret: Mapping[str, Any] | None, key: str) -> str | None:
    """One value of a Secret: an address (endpoint, region, bucket), or the registry token, sent only to the registry."""
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


@dataclass
class Delivery:
    """One pass over the steps for one CompressionJob: what it read, and the status it will write."""

    body: Mapping[str, Any]
    api: kube.Api
    config: OperatorConfig
    status: dict[str, Any] = field(init=False)
    conditions: list[dict[str, Any]] = field(init=False)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    source: dict[str, Any] | None = None  # the output connection Secret, once read

    def __post_init__(self) -> None:
        current = self.body.get("status") or {}
        self.status = {key: dict(current.get(key) or {}) for key in ("output", "serving", "registry")}
        self.conditions = [dict(c) for c in current.get("conditions") or []]

    def condition(self, kind: str) -> dict[str, Any]:
        return next((c for c in self.conditions if c.get("type") == kind), {})

    def report(self, kind: str, value: str, reason: str, message: str) -> None:
        """Set condition `kind`; a change of status or reason is also an Event (Warning when False)."""
        old = self.condition(kind)
        generation = self.body["metadata"].get("generation", 1)
        new = Condition(type=kind, status=value, reason=reason, message=message[:32768],
                        last_transition_time=now(), observed_generation=generation)
        self.conditions = set_condition(self.conditions, new)
        if (old.get("status"), old.get("reason")) != (value, reason):
            self.events.append(("Warning" if value == "False" else "Normal", reason, message[:1024]))

    async def output_connection(self, name: str) -> dict[str, Any] | None:
        if self.source is None:
            self.source = await asyncio.to_thread(kube.read_secret, self.api, self.body["metadata"]["namespace"], name)
        return self.source


async def publish(work: Delivery, job: CompressionJob) -> None:
    """The output's connection Secret, with the output's bucket and the dashboard's annotations and labels."""
    spec = job.spec
    if spec.output.publish_connection is None or work.status["output"].get("connection"):
        return
    if work.condition(PUBLISHED).get("reason") == "NameTaken":
        return
    source = await work.output_connection(spec.output.connection)
    if source is None:
        work.report(PUBLISHED, "False", "WaitingForReference",
                    f"spec.output.connection: Secret {spec.output.connection!r} not found; the connection is published once it is back")
        return
    recipe = work.body.get("status", {}).get("recipe") or recipe_summary(job)
    manifest = serving.published_connection(work.body, job, source.get("data") or {}, recipe)
    name = manifest["metadata"]["name"]
    outcome = await asyncio.to_thread(write_connection, work.api, manifest)
    if outcome == "taken":
        work.report(PUBLISHED, "False", "NameTaken", f"spec.output.publishConnection.name: Secret {name!r} exists and was not "
                                                     "written by ModelPress; name another connection")
        return
    bucket, path = serving.output_location(job)
    work.status["output"] = {"uri": spec.output.uri, "connection": name, "path": path}
    work.report(PUBLISHED, "True", "Published", f"connection {name} ({outcome}) holds bucket {bucket}; the model is at path {path}")


def connection_for(work: Delivery, job: CompressionJob) -> tuple[str | None, str | None]:
    """(connection serving an S3 output, why there can be none): the published one, else the output's own.

    (None, None) while the published connection is still to come.
    """
    if job.spec.output.publish_connection is not None:
        name = work.status["output"].get("connection")
        if name or work.condition(PUBLISHED).get("reason") != "NameTaken":
            return name, None
        return None, "the connection could not be published (see the Published condition)"
    bucket, _ = serving.output_location(job)
    named = decoded(work.source, S3Key.BUCKET)
    if named != bucket:
        held = f"names bucket {named!r}" if named else f"has no {S3Key.BUCKET}"
        return None, (f"connection {job.spec.output.connection!r} {held}, not the output's {bucket!r}; "
                      "set spec.output.publishConnection to publish one for the output")
    return job.spec.output.connection, None


async def serve(work: Delivery, job: CompressionJob) -> None:
    """Create the InferenceService (and, on OpenShift AI, a runtime from the platform's template) once."""
    spec, config = job.spec, work.config
    if spec.serve is None or work.status["serving"].get("name") or work.condition(SERVING).get("status") == "False":
        return
    namespace = work.body["metadata"]["namespace"]
    connection = None
    if parse_uri(spec.output.uri).scheme == "s3" and config.serving_platform == "openshift-ai":
        if spec.output.publish_connection is None:
            await work.output_connection(spec.output.connection)
        connection, problem = connection_for(work, job)
        if problem is not None:
            work.report(SERVING, "False", "NoConnection", f"not served: {problem}")
        if connection is None:
            return
    name = serving.isvc_name(work.body, job)
    runtime = spec.serve.runtime or config.serving_runtime
    try:
        if runtime is None and config.serving_platform == "openshift-ai":
            runtime = name
            if not await ensure_runtime(work, job, name):
                return
        manifest = serving.inference_service(work.body, job, config.serving_platform, runtime, connection)
        isvc = await asyncio.to_thread(kube.create_object, work.api, serving.ISVC, manifest)
    except ApiException as err:
        serving_refused(work, err, namespace)
        return
    if not serving.made_for(isvc, work.body):
        work.report(SERVING, "False", "NameTaken", f"spec.serve.name: InferenceService {name!r} exists and belongs to "
                                                   "something else; name another")
        return
    work.status["serving"] = {"name": name, "runtime": runtime, "ready": False}
    work.report(SERVING, "Unknown", "Deploying", f"created InferenceService {name}")


async def ensure_runtime(work: Delivery, job: CompressionJob, name: str) -> bool:
    """A ServingRuntime of the job's own from the platform's vLLM template; False (reported) when there can be none."""
    config, namespace = work.config, work.body["metadata"]["namespace"]
    existing = await asyncio.to_thread(kube.read_object, work.api, serving.RUNTIME, namespace, name)
    if existing is not None:
        if serving.made_for(existing, work.body):
            return True
        work.report(SERVING, "False", "NameTaken", f"spec.serve.name: ServingRuntime {name!r} exists and belongs to "
                                                   "something else; name another, or give spec.serve.runtime")
        return False
    template = await asyncio.to_thread(kube.read_object, work.api, serving.TEMPLATE, config.serving_template_namespace,
                                       config.serving_runtime_template)
    if template is None:
        work.report(SERVING, "False", "RuntimeTemplateNotFound",
                    f"Template {config.serving_template_namespace}/{config.serving_runtime_template} not found; give "
                    "spec.serve.runtime, or set MODELPRESS_SERVING_RUNTIME_TEMPLATE on the operator")
        return False
    try:
        manifest = serving.serving_runtime(template, name, work.body, owned=bool(job.spec.serve and job.spec.serve.delete_with_job))
    except serving.TemplateUnusable as err:
        work.report(SERVING, "False", "RuntimeTemplateUnusable", str(err))
        return False
    made = await asyncio.to_thread(kube.create_object, work.api, serving.RUNTIME, manifest)
    if not serving.made_for(made, work.body):
        work.report(SERVING, "False", "NameTaken", f"ServingRuntime {name!r} appeared and belongs to something else")
        return False
    return True


def serving_refused(work: Delivery, err: ApiException, namespace: str) -> None:
    """What the API server's refusal means for the user; a server error is tried again next time."""
    if err.status == 404:
        work.report(SERVING, "False", "ServingUnavailable", "the cluster serves no KServe InferenceServices or "
                                                             "ServingRuntimes (serving.kserve.io); install KServe or remove spec.serve")
    elif err.status == 403:
        work.report(SERVING, "False", "Forbidden", f"in {namespace}: {error_message(err, 1024)}; grant the operator what "
                                                   "deploy/base/rbac.yaml lists")
    elif err.status in (400, 422):
        work.report(SERVING, "False", "InferenceServiceRejected", f"the API server refused it: {error_message(err, 1024)}")
    else:
        work.report(SERVING, "Unknown", "Retrying", f"the API server answered {err.status}; trying again")


async def mirror(work: Delivery) -> None:
    """The InferenceService's readiness and URL, as of now."""
    name = work.status["serving"].get("name")
    if not name:
        return
    isvc = await asyncio.to_thread(kube.read_object, work.api, serving.ISVC, work.body["metadata"]["namespace"], name)
    state = serving.serving_state(isvc, name)
    work.status["serving"] = {**work.status["serving"], "url": state.url, "ready": state.ready}
    work.report(SERVING, state.status, state.reason, state.message)


def _later(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def register(work: Delivery, job: CompressionJob) -> None:
    """A new model version in the registry; retried with a doubling delay until it is there or refused."""
    spec, config, record = job.spec, work.config, work.status["registry"]
    if spec.registration is None or record.get("modelVersionId"):
        return
    if work.condition(REGISTERED).get("status") == "False" and work.condition(REGISTERED).get("reason") in FINAL_REGISTRY_REASONS:
        return
    if record.get("nextAttemptTime") and now() < record["nextAttemptTime"]:
        return
    connection, endpoint, region = None, None, None
    if parse_uri(spec.output.uri).scheme == "s3":
        source = await work.output_connection(spec.output.connection)
        connection, problem = connection_for(work, job)
        if connection is None and problem is None:
            return  # registered with the published connection, once it is there
        endpoint, region = decoded(source, S3Key.ENDPOINT), decoded(source, S3Key.REGION)
    attempts = int(record.get("attempts") or 0) + 1
    reg = registration(work.body, job, work.body.get("status", {}).get("result") or {},
                       work.body.get("status", {}).get("recipe") or recipe_summary(job), connection, endpoint, region)
    base = {"modelName": reg.model_name, "version": reg.version, "attempts": attempts}
    try:
        token = await registry_token(work, job)
        ids = await register_version(spec.registration.registry, token, reg, config.registry_timeout)
    except RegistryRetry as err:
        delay = min(config.registry_retry_delay * 2 ** (attempts - 1), config.registry_retry_max)
        when = _later(delay)
        work.status["registry"] = {**base, "nextAttemptTime": when}
        work.report(REGISTERED, "False", err.reason, f"{err} (attempt {attempts}; next at {when})")
        return
    except RegistryRefused as err:
        work.status["registry"] = {**base, "nextAttemptTime": None}
        work.report(REGISTERED, "False", err.reason, str(err))
        return
    work.status["registry"] = {**base, "nextAttemptTime": None, "registeredModelId": ids.registered_model_id,
                               "modelVersionId": ids.model_version_id, "modelArtifactId": ids.model_artifact_id}
    work.report(REGISTERED, "True", "Registered", f"{reg.model_name} version {reg.version} is in the Model Registry "
                                                  f"(version id {ids.model_version_id})")


async def registry_token(work: Delivery, job: CompressionJob) -> str | None:
    ref = job.spec.registration.token_secret
    if ref is None:
        return None
    secret = await asyncio.to_thread(kube.read_secret, work.api, work.body["metadata"]["namespace"], ref.name)
    token = decoded(secret, ref.key)
    if not token:
        raise RegistryRetry("WaitingForReference", f"spec.register.tokenSecret: Secret {ref.name!r} with key {ref.key!r} "
                                                   "not found; create it")
    return token.strip()


# --- the handlers --------------------------------------------------------------------------------------------


def _by_type(conditions: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in conditions}


def _clean(value: Mapping[str, Any]) -> dict[str, Any]:
    return {key: item for key, item in value.items() if item is not None}


async def deliver(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Every interval, for a succeeded job: the steps not yet done, then a look at the InferenceService."""
    current = body.get("status") or {}
    if current.get("phase") != "Succeeded":
        return
    try:
        job = parse(body)
    except SpecRejected:
        return
    spec = job.spec
    if spec.output.publish_connection is None and spec.serve is None and spec.registration is None:
        return
    work = Delivery(body, memo.api, memo.config)
    await publish(work, job)
    await serve(work, job)
    await mirror(work)
    await register(work, job)
    for key, value in work.status.items():
        if value and _clean(value) != (current.get(key) or {}):
            patch.status[key] = value  # a merge patch: None removes a field
    if _by_type(work.conditions) != _by_type(current.get("conditions") or []):
        patch.status["conditions"] = work.conditions
    for kind, reason, message in work.events:
        kopf.event(body, type=kind, reason=reason, message=message)
        logger.info("%s: %s", reason, message)


async def undeliver(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """On deletion, remove what the spec asked to go with the job (`deleteWithJob`); the rest stays the user's."""
    try:
        job = parse(body)
    except SpecRejected:
        return
    status, namespace = body.get("status") or {}, body["metadata"]["namespace"]
    serve_spec, publish_spec = job.spec.serve, job.spec.output.publish_connection
    name = (status.get("serving") or {}).get("name")
    if serve_spec is not None and serve_spec.delete_with_job and name:
        await asyncio.to_thread(kube.delete_object, memo.api, serving.ISVC, namespace, name)
        runtime = await asyncio.to_thread(kube.read_object, memo.api, serving.RUNTIME, namespace, name)
        if runtime is not None and serving.made_for(runtime, body):
            await asyncio.to_thread(kube.delete_object, memo.api, serving.RUNTIME, namespace, name)
    connection = (status.get("output") or {}).get("connection")
    if publish_spec is not None and publish_spec.delete_with_job and connection:
        secret = await asyncio.to_thread(kube.read_secret, memo.api, namespace, connection)
        if secret is not None and serving.made_for(secret, body):
            await asyncio.to_thread(kube.delete_secret, memo.api, namespace, connection)


def register_handlers(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Attach the delivery timer and its deletion handler to `registry`."""
    kopf.timer(*RESOURCE, interval=config.sync_interval, registry=registry, id="deliver")(deliver)
    kopf.on.delete(*RESOURCE, registry=registry, id="undeliver")(undeliver)
