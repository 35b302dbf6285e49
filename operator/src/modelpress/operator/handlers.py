"""kopf handlers: each reads the CompressionJob, calls the pure builders, and makes the API calls.

Handlers are registered by `register()` into a registry of the caller's choosing, with the
intervals from `OperatorConfig`; the config and the API client travel in kopf's `memo`.
Status is the only thing written on a CompressionJob; the spec is never touched.

A run is launched once: `launch` makes the scratch claim and the Job, and `sync` follows them from
then on, even when the Job vanishes (its TTL, a person), reading the outcome from the pods the
outcome finalizer keeps. When the run has ended, `sync` writes the outcome first and only then
lets go of what the run held (`_finish`), so an operator stopped at any point loses nothing.
"""

import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from modelpress.operator import delivery, kube, metrics
from modelpress.operator.conditions import observed
from modelpress.operator.config import OperatorConfig
from modelpress.operator.crd import GROUP, PLURAL, VERSION
from modelpress.operator.faults import Blocker, refusal
from modelpress.operator.job_builder import (CONTAINER, LABEL_UID, OUTCOME_FINALIZER, build_claim, build_job, claim_name,
                                             configmap_refs, is_kueue_managed, job_name, recipe_summary, secret_refs)
from modelpress.operator.status import (TERMINAL_PHASES, Observation, escalate, finished, finished_patch, newest_pod, observe,
                                        observe_without_job, parse_memory_estimate, parse_progress, reconciling, stalled_since, status_patch)
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
    memo.api = kube.load_client(memo.config.api_timeout)
    metrics.serve(memo.config.metrics_port)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else the kubeconfig `$KUBECONFIG` names (read now, not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _generation(body: kopf.Body) -> int:
    return body["metadata"].get("generation", 1)


def _fail(body: kopf.Body, patch: kopf.Patch, reason: str, problem: str) -> None:
    """End the run before any Job exists: Failed with `reason`, one Warning event; with no pod to
    release, the operator is done with it at once."""
    observation = Observation(phase="Failed", reason=reason, message=problem)
    update = status_patch(body.get("status") or {}, _generation(body), observation, None)
    patch.status.update({**update, **finished_patch(update, _generation(body))})
    kopf.event(body, type="Warning", reason=reason, message=problem)
    metrics.PHASES.labels("Failed", reason).inc()


def _reject(body: kopf.Body, patch: kopf.Patch, problem: str) -> None:
    _fail(body, patch, "InvalidSpec", problem)


def _owned(obj: Mapping[str, Any], uid: str) -> bool:
    return uid in [ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []]


def _own_pods(pods: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """The pods of this CompressionJob's Job (not those of an older Job that had the same name)."""
    return [pod for pod in pods if (pod["metadata"].get("labels") or {}).get(LABEL_UID, uid) == uid]


def _refused(body: kopf.Body, patch: kopf.Patch, blocker: Blocker, config: OperatorConfig) -> None:
    """A create the API server refused: Pending and retried for a full quota, Failed otherwise."""
    if blocker.kind == "fatal":
        _fail(body, patch, blocker.reason, blocker.message)
        return
    waiting = Observation(phase="Pending", reason=blocker.reason, message=blocker.message)
    patch.status.update(status_patch(body.get("status") or {}, _generation(body), waiting, None))
    raise kopf.TemporaryError(blocker.message, delay=config.retry_delay)


def _create(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, manifest: dict[str, Any], what: str) -> bool | None:
    """Create (or adopt) the claim or the Job -> whether it was created; None when the run cannot go on."""
    name = manifest["metadata"]["name"]
    try:
        existing, created = (kube.create_job if manifest["kind"] == "Job" else kube.create_claim)(memo.api, manifest)
    except ApiException as err:
        blocker = refusal(err.status, kube.error_message(err), f"{what} {name}")
        if blocker is None:
            raise
        _refused(body, patch, blocker, memo.config)
        return None
    if not _owned(existing, body["metadata"]["uid"]):
        _reject(body, patch, f"metadata.name: {manifest['kind']} {name!r} already exists and belongs to something else; "
                             "delete it or rename this CompressionJob")
        return None
    return created


def launch(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Validate, then create (or adopt) the scratch claim and the runner Job. Runs on create and on
    operator start; a run whose Job was made before, even one that has vanished since, is `sync`'s."""
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES or status.get("jobName"):
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
        patch.status.update(status_patch(status, _generation(body), waiting, None))
        raise kopf.TemporaryError(message, delay=config.retry_delay)
    if wrong := missing_keys(job, secrets, configmaps):
        _reject(body, patch, "; ".join(wrong))
        return
    if config.scratch_volume == "persistentVolumeClaim":
        claim = build_claim(body, job, config)
        if _create(body, patch, memo, claim, "the scratch claim") is None:
            return
        patch.status["scratchClaim"] = claim["metadata"]["name"]
    ca_keys = kube.configmap_keys(memo.api, namespace, config.ca_bundle_configmap) or set()
    manifest = build_job(body, job, config, ca_keys)
    created = _create(body, patch, memo, manifest, "the runner Job")
    if created is None:
        return
    patch.status["jobName"] = manifest["metadata"]["name"]
    patch.status["recipe"] = recipe_summary(job)
    if created:
        metrics.JOBS_CREATED.inc()
        kopf.event(body, type="Normal", reason="JobCreated", message=f"created Job {manifest['metadata']['name']}")
        pending = Observation(phase="Pending", reason="JobCreated", message="waiting for the runner pod to start")
        patch.status.update(status_patch(status, _generation(body), pending, None))
    else:
        logger.info("adopted the existing Job %s", manifest["metadata"]["name"])


def sync(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Mirror the Job, its newest pod and the runner's progress into status; post an event on each
    transition; once the run has ended, let go of what it held."""
    status = body.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES:
        if reconciling(status):
            _finish(body, memo, status)
        seen = observed(status, _generation(body))  # a finished job's new generation (suspend toggled in Git) is seen
        if seen:
            kube.patch_status(memo.api, body["metadata"]["namespace"], body["metadata"]["name"], seen)
        return
    name = status.get("jobName")
    if not name:
        return
    meta, config = body["metadata"], memo.config
    namespace = meta["namespace"]
    job = kube.read_job(memo.api, namespace, name)
    pods = _own_pods(kube.job_pods(memo.api, namespace, name), meta["uid"])
    newest = newest_pod(pods)
    if job is None:
        observation = observe_without_job(pods, name)
    else:
        _hold_suspend(body, memo, job, logger)
        # FailedCreate events matter only while the Job runs and has no pod on its way.
        making = (newest is None or finished(newest)) and not _job_finished(job)
        events = kube.job_events(memo.api, namespace, name) if making else []
        observation = observe(job, pods, kueue=is_kueue_managed(body), events=events)
    observation = escalate(observation, status, datetime.datetime.now(datetime.UTC), config.stall_timeout)
    progress = memory = None
    if newest is not None and (newest.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
        tail = kube.log_tail(memo.api, namespace, newest["metadata"]["name"], CONTAINER, config.log_tail_lines)
        progress = parse_progress(tail, status.get("progress"))
        memory = parse_memory_estimate(tail)
    update = status_patch(status, _generation(body), observation, progress, memory)
    if _changed(status, update):
        kube.patch_status(memo.api, namespace, meta["name"], update)
    if observation.phase != status.get("phase") or (observation.stalled and stalled_since(status) is None):
        _announce(body, status, observation)
    if observation.phase in TERMINAL_PHASES:
        _finish(body, memo, {**status, **update})
        return
    for pod in pods:  # a finished pod that is not the newest has nothing more to tell
        if pod is not newest and finished(pod):
            kube.release_pod(memo.api, pod, OUTCOME_FINALIZER)


def _finish(body: kopf.Body, memo: kopf.Memo, status: Mapping[str, Any]) -> None:
    """After the outcome is written: stop a Job the operator ended itself (nothing may start later),
    release the pods, delete the scratch claim after a success when the spec asks, and say so."""
    meta = body["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    name = status.get("jobName")
    if name:
        job = kube.read_job(memo.api, namespace, name)
        if job is not None and _owned(job, uid) and not _job_finished(job):
            kube.delete_job(memo.api, namespace, name)
        for pod in _own_pods(kube.job_pods(memo.api, namespace, name), uid):
            kube.release_pod(memo.api, pod, OUTCOME_FINALIZER)
    update = finished_patch(status, _generation(body))
    claim = status.get("scratchClaim")
    if claim and status.get("phase") == "Succeeded" and _delete_scratch_on_success(body):
        kube.delete_claim(memo.api, namespace, claim)
        update["scratchClaim"] = None
        kopf.event(body, type="Normal", reason="ScratchDeleted", message=f"deleted the scratch claim {claim}")
    kube.patch_status(memo.api, namespace, meta["name"], update)


def _job_finished(job: Mapping[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _delete_scratch_on_success(body: kopf.Body) -> bool:
    return bool(((body.get("spec") or {}).get("runtime") or {}).get("scratchVolume", {}).get("deleteOnSuccess"))


def _changed(status: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    return any(status.get(key) != value for key, value in update.items())


def _announce(body: kopf.Body, status: Mapping[str, Any], observation: Observation) -> None:
    message = f"{observation.phase}: {observation.message}" if observation.message else observation.phase
    if observation.phase == "Failed" or observation.stalled:
        kopf.event(body, type="Warning", reason=observation.reason, message=message)
    else:
        kopf.event(body, type="Normal", reason=observation.reason, message=message)
    metrics.PHASES.labels(observation.phase, observation.reason).inc()
    if observation.phase in TERMINAL_PHASES and observation.start_time and observation.completion_time:
        metrics.DURATION.labels(observation.phase).observe(_seconds(observation.start_time, observation.completion_time))


def _seconds(start: str, end: str) -> float:
    return max(0.0, (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds())


def suspend(body: kopf.Body, old: Any, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Carry a change of spec.runtime.suspend to the Job at once, unless Kueue owns the Job's suspension."""
    status = body.get("status") or {}
    name = status.get("jobName")
    if not name or status.get("phase") in TERMINAL_PHASES:
        return
    if is_kueue_managed(body):
        if old is not None:  # a change, not the job's creation
            kopf.event(body, type="Normal", reason="SuspendIgnored", message="Kueue manages this Job's suspension; change the queue instead")
        return
    job = kube.read_job(memo.api, body["metadata"]["namespace"], name)
    if job is not None:
        _hold_suspend(body, memo, job, logger)


def _hold_suspend(body: kopf.Body, memo: kopf.Memo, job: Mapping[str, Any], logger: logging.Logger) -> None:
    """The Job's suspend follows spec.runtime.suspend, checked on every sync as well: a change that
    lands while `launch` is still creating the Job reaches kopf as part of the creation, with no old
    value to tell it from the default, and would otherwise be lost."""
    wanted = bool(((body.get("spec") or {}).get("runtime") or {}).get("suspend"))
    if is_kueue_managed(body) or _job_finished(job) or bool((job.get("spec") or {}).get("suspend")) == wanted:
        return
    name = job["metadata"]["name"]
    kube.set_job_suspended(memo.api, body["metadata"]["namespace"], name, wanted)
    logger.info("Job %s suspend=%s", name, wanted)


def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Delete the Job and its pods, release the pods, delete the scratch claim (ownerReferences do the
    same where a garbage collector runs; pods held by the outcome finalizer need the release)."""
    meta = body["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    name = (body.get("status") or {}).get("jobName") or job_name(meta["name"])
    job = kube.read_job(memo.api, namespace, name)
    if job is not None and _owned(job, uid):
        kube.delete_job(memo.api, namespace, name)
    for pod in _own_pods(kube.job_pods(memo.api, namespace, name), uid):
        kube.release_pod(memo.api, pod, OUTCOME_FINALIZER)
    claim = kube.read_claim(memo.api, namespace, claim_name(meta["name"]))
    if claim is not None and _owned(claim, uid):
        kube.delete_claim(memo.api, namespace, claim["metadata"]["name"])


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> kopf.OperatorRegistry:
    """Attach every handler to `registry`, timed by `config`."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.create(*RESOURCE, registry=registry, id="launch")(launch)
    kopf.on.resume(*RESOURCE, registry=registry, id="launch")(launch)
    kopf.on.field(*RESOURCE, field="spec.runtime.suspend", registry=registry, id="suspend")(suspend)
    kopf.timer(*RESOURCE, interval=config.sync_interval, registry=registry, id="sync")(sync)
    kopf.on.delete(*RESOURCE, registry=registry, id="cleanup")(cleanup)
    delivery.register_handlers(registry, config)
    return registry
