"""kopf handlers: each reads the CompressionJob, calls the pure builders, and makes the API calls.

Handlers are registered by `register()` into a registry of the caller's choosing, with the
intervals from `OperatorConfig`; the config and the API client travel in kopf's `memo`.
Status is the only thing written on a CompressionJob; the spec is never touched.
"""

import logging
from datetime import datetime
from collections.abc import Mapping
from typing import Any

import kopf

from modelpress.operator import kube, metrics
from modelpress.operator.config import OperatorConfig
from modelpress.operator.crd import GROUP, PLURAL, VERSION
from modelpress.operator.job_builder import (CONTAINER, build_job, configmap_refs, is_kueue_managed, job_name,
                                      recipe_summary, secret_refs)
from modelpress.operator.status import (TERMINAL_PHASES, Observation, observe, parse_memory_estimate, parse_progress,
                                        status_patch)
from modelpress.operator.validation import SpecRejected, missing_keys, missing_objects, parse

RESOURCE = (GROUP, VERSION, PLURAL)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping in ModelPress's own annotations, so `status` belongs to ModelPress."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.connect_timeout = 10
    memo.api = kube.load_client()
    metrics.serve(memo.config.metrics_port)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else the kubeconfig `$KUBECONFIG` names (read now, not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _reject(body: kopf.Body, patch: kopf.Patch, problem: str) -> None:
    generation = body["metadata"].get("generation", 1)
    observation = Observation(phase="Failed", reason="InvalidSpec", message=problem)
    patch.status.update(status_patch(body.get("status") or {}, generation, observation, None))
    kopf.event(body, type="Warning", reason="InvalidSpec", message=problem)
    metrics.PHASES.labels("Failed", "InvalidSpec").inc()


def launch(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Validate, then create (or adopt) the runner Job. Runs on create and on operator start."""
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES:
        return
    try:
        job = parse(body)
    except SpecRejected as err:
        _reject(body, patch, str(err))
        return
    namespace, config = body["metadata"]["namespace"], memo.config
    secrets = {name: kube.secret_keys(memo.api, namespace, name) for name in secret_refs(job)}
    configmaps = {name: kube.configmap_keys(memo.api, namespace, name) for name in configmap_refs(job)}
    if missing := missing_objects(job, secrets, configmaps):
        message = "; ".join(missing)
        waiting = Observation(phase="Pending", reason="WaitingForReference", message=message)
        patch.status.update(status_patch(status, body["metadata"].get("generation", 1), waiting, None))
        raise kopf.TemporaryError(message, delay=config.retry_delay)
    if wrong := missing_keys(job, secrets, configmaps):
        _reject(body, patch, "; ".join(wrong))
        return
    ca_keys = kube.configmap_keys(memo.api, namespace, config.ca_bundle_configmap) or set()
    manifest = build_job(body, job, config, ca_keys)
    existing, created = kube.create_job(memo.api, manifest)
    owners = [ref.get("uid") for ref in existing["metadata"].get("ownerReferences") or []]
    if body["metadata"]["uid"] not in owners:
        _reject(body, patch, f"metadata.name: Job {manifest['metadata']['name']!r} already exists and belongs to "
                             "something else; delete it or rename this CompressionJob")
        return
    patch.status["jobName"] = manifest["metadata"]["name"]
    patch.status["recipe"] = recipe_summary(job)
    if created:
        metrics.JOBS_CREATED.inc()
        kopf.event(body, type="Normal", reason="JobCreated", message=f"created Job {manifest['metadata']['name']}")
        pending = Observation(phase="Pending", reason="JobCreated", message="waiting for the runner pod to start")
        patch.status.update(status_patch(status, body["metadata"].get("generation", 1), pending, None))
    else:
        logger.info("adopted the existing Job %s", manifest["metadata"]["name"])


def sync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Mirror the Job, its pods and the runner's progress into status; post an event on each transition."""
    status = body.get("status") or {}
    name = status.get("jobName")
    if not name or status.get("phase") in TERMINAL_PHASES:
        return
    namespace, config = body["metadata"]["namespace"], memo.config
    job = kube.read_job(memo.api, namespace, name)
    if job is None:
        observation = Observation(phase="Failed", reason="JobDeleted",
                                  message=f"Job {name} was deleted before it finished; create a new CompressionJob")
        pods: list[dict[str, Any]] = []
    else:
        pods = kube.job_pods(memo.api, namespace, name)
        observation = observe(job, pods, kueue=is_kueue_managed(body))
    progress = memory = None
    started = [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")]
    if started:
        tail = kube.log_tail(memo.api, namespace, started[-1]["metadata"]["name"], CONTAINER, config.log_tail_lines)
        progress = parse_progress(tail, status.get("progress"))
        memory = parse_memory_estimate(tail)
    update = status_patch(status, body["metadata"].get("generation", 1), observation, progress, memory)
    if _changed(status, update):
        patch.status.update(update)
    if observation.phase != status.get("phase"):
        _announce(body, status, observation)


def _changed(status: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    return any(status.get(key) != value for key, value in update.items())


def _announce(body: kopf.Body, status: Mapping[str, Any], observation: Observation) -> None:
    message = f"{observation.phase}: {observation.message}" if observation.message else observation.phase
    if observation.phase == "Failed":
        kopf.event(body, type="Warning", reason=observation.reason, message=message)
    else:
        kopf.event(body, type="Normal", reason=observation.reason, message=message)
    metrics.PHASES.labels(observation.phase, observation.reason).inc()
    if observation.phase in TERMINAL_PHASES and observation.start_time and observation.completion_time:
        metrics.DURATION.labels(observation.phase).observe(_seconds(observation.start_time, observation.completion_time))


def _seconds(start: str, end: str) -> float:
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def suspend(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Carry a change of spec.runtime.suspend to the Job, unless Kueue owns the Job's suspension."""
    name = (body.get("status") or {}).get("jobName")
    if old is None or not name or (body.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return
    if is_kueue_managed(body):
        kopf.event(body, type="Normal", reason="SuspendIgnored", message="Kueue manages this Job's suspension; change the queue instead")
        return
    kube.set_job_suspended(memo.api, body["metadata"]["namespace"], name, bool(new))
    logger.info("Job %s suspend=%s", name, bool(new))


def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Delete the Job and its pods (ownerReferences do the same where a garbage collector runs)."""
    name = (body.get("status") or {}).get("jobName") or job_name(body["metadata"]["name"])
    kube.delete_job(memo.api, body["metadata"]["namespace"], name)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> kopf.OperatorRegistry:
    """Attach every handler to `registry`, timed by `config`."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.create(*RESOURCE, registry=registry, id="launch")(launch)
    kopf.on.resume(*RESOURCE, registry=registry, id="launch")(launch)
    kopf.on.field(*RESOURCE, field="spec.runtime.suspend", registry=registry, id="suspend")(suspend)
    kopf.timer(*RESOURCE, interval=config.sync_interval, registry=registry, id="sync")(sync)
    kopf.on.delete(*RESOURCE, registry=registry, id="cleanup")(cleanup)
    return registry
