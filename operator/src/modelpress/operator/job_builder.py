"""The runner Job and its scratch claim for a CompressionJob, built by pure functions from the resource and the settings.

The pod follows the runner's contract (see `modelpress.contract`): the job document as JSON in
`Env.SPEC`, each S3 connection's keys as `secretKeyRef` env prefixed by the connection's
role, the hub token as `Env.HF_TOKEN`, scratch space and caches on one volume, the result in the
termination message. Secret values never appear in the manifest, only references to them.

The scratch volume is one PersistentVolumeClaim per CompressionJob, owned by it, so every pod retry
mounts what the last pod left there. Each pod carries `OUTCOME_FINALIZER` from the template: it
stays readable (exit code, termination message) until the operator has copied its outcome into
the status, even when the Job is deleted by its TTL or by hand.
"""

import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any

from modelpress.operator.config import OperatorConfig
from modelpress.operator.crd import GROUP
from modelpress.contract import (API_VERSION, KIND, PERMANENT_EXIT_CODES, S3_KEYS, S3_REQUIRED_KEYS, CompressionJob, Env,
                                 PodPath, S3Key, connection_uses, parse_uri, pvc_mount)

CONTAINER = "runner"
# The CompressionJob's name as a label (shortened when it would not fit) and in full as an annotation.
LABEL_JOB = f"{GROUP}/compressionjob-name"
ANNOTATION_JOB = LABEL_JOB
LABEL_UID = f"{GROUP}/compressionjob-uid"
OUTCOME_FINALIZER = f"{GROUP}/runner-outcome"
KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
MAX_NAME = 63  # a label value's limit; a Job's name becomes one on its pods

# Where each cache lives on the scratch volume: the image filesystem is not writable under restricted-v2.
CACHE_ENV = {
    "HOME": f"{PodPath.SCRATCH}/home",
    "HF_HOME": f"{PodPath.SCRATCH}/huggingface",
    "XDG_CACHE_HOME": f"{PodPath.SCRATCH}/cache",
    "TRITON_CACHE_DIR": f"{PodPath.SCRATCH}/cache/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{PodPath.SCRATCH}/cache/torchinductor",
    "NUMBA_CACHE_DIR": f"{PodPath.SCRATCH}/cache/numba",
    "MPLCONFIGDIR": f"{PodPath.SCRATCH}/cache/matplotlib",
}

# The injected bundle (system roots plus cluster CAs), the custom CAs, and where OpenShift AI's
# convention mounts each key.
CLUSTER_CA, CUSTOM_CA = "ca-bundle.crt", "odh-ca-bundle.crt"
CA_MOUNTS = {
    CLUSTER_CA: "/etc/pki/tls/certs/odh-trusted-ca-bundle.crt",
    CUSTOM_CA: "/etc/ssl/certs/odh-ca-bundle.crt",
}
# With both keys, an init container joins them here: each CA variable replaces the default trust
# store, so it must name one file holding the public roots, the cluster's CAs and the custom ones.
TRUST_DIR = "/etc/modelpress/trust"
TRUST_BUNDLE = f"{TRUST_DIR}/ca-bundle.pem"
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", S3Key.CA_BUNDLE)


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(cr_name: str, suffix: str) -> str:
    """`<name>-<suffix>`, shortened with a hash of the name when it would pass 63 characters."""
    name = f"{cr_name}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = _digest(cr_name, 8)
    keep = MAX_NAME - len(digest) - len(suffix) - 2
    return f"{cr_name[:keep].rstrip('-.')}-{digest}-{suffix}"


def job_name(cr_name: str) -> str:
    return child_name(cr_name, "runner")


def claim_name(cr_name: str) -> str:
    return child_name(cr_name, "scratch")


def label_value(text: str) -> str:
    """`text` as a label value: itself up to 63 characters, else a prefix and a hash of the whole."""
    if len(text) <= MAX_NAME:
        return text
    digest = _digest(text, 10)
    return f"{text[:MAX_NAME - len(digest) - 1].rstrip('-._')}-{digest}"


def connection_roles(job: CompressionJob) -> dict[str, str]:
    """Env prefix -> connection Secret name, for every S3 connection the job names."""
    return {use.role.prefix: use.secret for use in connection_uses(job.spec) if use.secret is not None}


def secret_refs(job: CompressionJob) -> dict[str, list[str]]:
    """Secret name -> keys the pod reads from it (what the operator checks before creating the Job)."""
    refs: dict[str, list[str]] = {}
    for secret in connection_roles(job).values():
        refs.setdefault(secret, []).extend(k for k in S3_REQUIRED_KEYS if k not in refs.get(secret, []))
    if job.spec.model.token_secret is not None:
        ref = job.spec.model.token_secret
        refs.setdefault(ref.name, []).append(ref.key)
    return refs


def configmap_refs(job: CompressionJob) -> dict[str, list[str]]:
    """ConfigMap name -> keys the pod reads from it."""
    ref = job.spec.recipe.config_map
    return {} if ref is None else {ref.name: [ref.key]}


def recipe_summary(job: CompressionJob) -> str:
    """The recipe in a few words, e.g. `W4A16 GPTQ g64`."""
    recipe = job.spec.recipe
    if recipe.preset is not None:
        group = f" g{recipe.group_size}" if recipe.group_size else ""
        return f"{recipe.preset} {recipe.algorithm}{group}"
    if recipe.config_map is not None:
        return f"configMap {recipe.config_map.name}/{recipe.config_map.key}"
    return "modifiers"


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def labels(body: Mapping[str, Any]) -> dict[str, str]:
    """Labels of every object made for a CompressionJob (never Argo CD's tracking label)."""
    meta = body["metadata"]
    return {
        "app.kubernetes.io/name": "modelpress-runner",
        "app.kubernetes.io/managed-by": "modelpress-operator",
        "app.kubernetes.io/part-of": "modelpress",
        LABEL_JOB: label_value(meta["name"]),
        LABEL_UID: meta["uid"],
    }


def annotations(body: Mapping[str, Any]) -> dict[str, str]:
    """The CompressionJob's full name, which its label may only abbreviate."""
    return {ANNOTATION_JOB: body["metadata"]["name"]}


def _child_meta(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, "namespace": body["metadata"]["namespace"], "labels": labels(body),
            "annotations": annotations(body), "ownerReferences": [owner_reference(body)]}


def build_claim(body: Mapping[str, Any], job: CompressionJob, config: OperatorConfig) -> dict[str, Any]:
    """The CompressionJob's scratch PersistentVolumeClaim: sized by the spec, outliving every pod."""
    scratch = job.spec.runtime.scratch_volume
    spec: dict[str, Any] = {"accessModes": [scratch.access_mode or config.scratch_access_mode],
                            "resources": {"requests": {"storage": job.spec.runtime.resources.scratch}}}
    storage_class = scratch.storage_class_name or config.scratch_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _child_meta(body, claim_name(body["metadata"]["name"])), "spec": spec}


def runner_document(body: Mapping[str, Any]) -> str:
    """The job as the runner reads it: the spec exactly as stored, and the identifying metadata."""
    meta = body["metadata"]
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid") if meta.get(key)},
        "spec": body["spec"],
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def _secret_env(name: str, secret: str, key: str, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _pvc_claims(job: CompressionJob) -> dict[str, bool]:
    """PVC claim -> whether the pod only reads it (pvc:// model is read, pvc:// output is written)."""
    claims: dict[str, bool] = {}
    for text, read_only in ((job.spec.model.uri, True), (job.spec.output.uri, False)):
        uri = parse_uri(text)
        if uri.scheme == "pvc":
            claims[uri.root] = claims.get(uri.root, True) and read_only
    return claims


def build_env(body: Mapping[str, Any], job: CompressionJob, config: OperatorConfig,
              ca_bundle_keys: Collection[str] = ()) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": Env.SPEC, "value": runner_document(body)},
        {"name": Env.SCRATCH, "value": PodPath.SCRATCH},
        {"name": Env.PVC_ROOT, "value": PodPath.PVC_ROOT},
        {"name": Env.TERMINATION_LOG, "value": PodPath.TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": key, "value": value} for key, value in CACHE_ENV.items()]
    for prefix, secret in connection_roles(job).items():
        env += [_secret_env(prefix + key, secret, key, key not in S3_REQUIRED_KEYS) for key in S3_KEYS]
    if job.spec.model.token_secret is not None:
        ref = job.spec.model.token_secret
        env.append(_secret_env(Env.HF_TOKEN, ref.name, ref.key, optional=False))
    if job.spec.recipe.config_map is not None:
        env.append({"name": Env.RECIPE_FILE, "value": PodPath.RECIPE_FILE})
    if job.spec.runtime.resources.gpus:
        env.append({"name": Env.GPUS, "value": str(job.spec.runtime.resources.gpus)})
    bundle = trust_bundle(ca_bundle_keys)
    if bundle is not None:
        env += [{"name": name, "value": bundle} for name in CA_VARIABLES]
    env += [{"name": key, "value": value} for key, value in sorted(config.proxy_env.items())]
    return env


def _ca_keys(ca_bundle_keys: Collection[str]) -> list[str]:
    return [key for key in CA_MOUNTS if key in ca_bundle_keys]


def trust_bundle(ca_bundle_keys: Collection[str]) -> str | None:
    """The file the CA variables name: the one bundle mounted, or the two joined; None without any."""
    keys = _ca_keys(ca_bundle_keys)
    if len(keys) > 1:
        return TRUST_BUNDLE
    return CA_MOUNTS[keys[0]] if keys else None


def _ca_mounts(keys: list[str]) -> list[dict[str, Any]]:
    return [{"name": "trusted-ca", "mountPath": CA_MOUNTS[key], "subPath": key, "readOnly": True} for key in keys]


def build_volumes(cr_name: str, job: CompressionJob, config: OperatorConfig,
                  ca_bundle_keys: Collection[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the runner container's mounts."""
    resources = job.spec.runtime.resources
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": PodPath.SCRATCH}]
    if config.scratch_volume == "emptyDir":
        volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": resources.scratch}})
    else:
        volumes.append({"name": "scratch", "persistentVolumeClaim": {"claimName": claim_name(cr_name)}})
    if job.spec.recipe.config_map is not None:
        ref = job.spec.recipe.config_map
        volumes.append({"name": "recipe", "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": PodPath.RECIPE_NAME}]}})
        mounts.append({"name": "recipe", "mountPath": PodPath.RECIPE_DIR, "readOnly": True})
    for index, (claim, read_only) in enumerate(sorted(_pvc_claims(job).items())):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{index}", "mountPath": pvc_mount(claim), "readOnly": read_only})
    keys = _ca_keys(ca_bundle_keys)
    if keys:
        volumes.append({"name": "trusted-ca", "configMap": {
            "name": config.ca_bundle_configmap, "optional": True, "items": [{"key": key, "path": key} for key in keys]}})
        mounts += _ca_mounts(keys)
    if trust_bundle(ca_bundle_keys) == TRUST_BUNDLE:
        volumes.append({"name": "trust", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
        mounts.append({"name": "trust", "mountPath": TRUST_DIR, "readOnly": True})
    return volumes, mounts


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def trust_container(image: str, ca_bundle_keys: Collection[str]) -> dict[str, Any]:
    """Joins the mounted bundles into TRUST_BUNDLE before the runner starts."""
    paths = [CA_MOUNTS[key] for key in _ca_keys(ca_bundle_keys)]
    return {
        "name": "trust-bundle",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", f'cat "$@" > {TRUST_BUNDLE}', "sh", *paths],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [*_ca_mounts(_ca_keys(ca_bundle_keys)), {"name": "trust", "mountPath": TRUST_DIR}],
        "securityContext": _security_context(),
    }


def build_resources(job: CompressionJob, config: OperatorConfig) -> dict[str, Any]:
    """Requests and limits; GPUs as the extended resource (requests equal limits), memory capped."""
    res = job.spec.runtime.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if config.scratch_volume == "emptyDir":
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = res.scratch
    if res.gpus:
        requests[res.gpu_resource] = limits[res.gpu_resource] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def build_tolerations(job: CompressionJob) -> list[dict[str, Any]]:
    """The spec's tolerations, plus the usual GPU taint's when GPUs are asked and none names it."""
    runtime = job.spec.runtime
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in runtime.tolerations]
    gpu = runtime.resources.gpu_resource
    if runtime.resources.gpus and not any(t.key == gpu for t in runtime.tolerations):
        tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def runner_image(job: CompressionJob, config: OperatorConfig) -> str:
    """The spec's image, else the operator's GPU image for a job with GPUs, else its CPU image."""
    return job.spec.runtime.image or (config.gpu_runner_image if job.spec.runtime.resources.gpus else config.runner_image)


def pod_failure_policy() -> dict[str, Any]:
    """Evictions and preemptions never count as retries (checked first: a pod stopped that way may
    exit with any code); invalid input and a failed quality gate fail the Job at once; anything
    else, an OOM kill included, counts against backoffLimit."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": [int(code) for code in PERMANENT_EXIT_CODES]}},
    ]}


def build_job(body: Mapping[str, Any], job: CompressionJob, config: OperatorConfig,
              ca_bundle_keys: Collection[str] = ()) -> dict[str, Any]:
    """The batch/v1 Job running the runner for one CompressionJob `body` (already validated as `job`)."""
    runtime = job.spec.runtime
    meta = body["metadata"]
    cr_labels = meta.get("labels") or {}
    pod_labels = labels(body)
    image = runner_image(job, config)
    volumes, mounts = build_volumes(meta["name"], job, config, ca_bundle_keys)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(config.runner_command),
        "env": build_env(body, job, config, ca_bundle_keys),
        "resources": build_resources(job, config),
        "volumeMounts": mounts,
        "terminationMessagePath": PodPath.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _security_context(),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if trust_bundle(ca_bundle_keys) == TRUST_BUNDLE:
        pod["initContainers"] = [trust_container(image, ca_bundle_keys)]
    tolerations = build_tolerations(job)
    if tolerations:
        pod["tolerations"] = tolerations
    for key, value in (("nodeSelector", runtime.node_selector), ("affinity", runtime.affinity),
                       ("priorityClassName", runtime.priority_class_name),
                       ("serviceAccountName", runtime.service_account_name)):
        if value:
            pod[key] = value
    spec: dict[str, Any] = {
        "backoffLimit": runtime.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": runtime.suspend,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": pod_labels, "annotations": annotations(body),
                                  "finalizers": [OUTCOME_FINALIZER]}, "spec": pod},
    }
    deadline = runtime.active_deadline_seconds or config.active_deadline_seconds
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    if runtime.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    metadata = _child_meta(body, job_name(meta["name"]))
    metadata["labels"].update({k: cr_labels[k] for k in KUEUE_LABELS if k in cr_labels})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def is_kueue_managed(body: Mapping[str, Any]) -> bool:
    """Kueue owns `suspend` on Jobs carrying its queue label; the operator must never flip it."""
    return KUEUE_LABELS[0] in (body["metadata"].get("labels") or {})
