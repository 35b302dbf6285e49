"""Operator settings, read once from the environment (the Deployment sets them)."""

import os
import shlex
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

from modelpress.contract import GPU_IMAGE_SETTING, AccessMode

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
SCRATCH_KINDS = ("persistentVolumeClaim", "emptyDir")
ACCESS_MODES: tuple[str, ...] = get_args(AccessMode)
ServingPlatform = Literal["openshift-ai", "kserve"]
SERVING_PLATFORMS: tuple[str, ...] = get_args(ServingPlatform)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _choice(env: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = env.get(name) or default
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {value!r})")
    return value


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator does not read from a CompressionJob."""

    runner_image: str = "quay.io/modelpress/runner:0.1.0"
    # The image of jobs that ask for GPUs: torch built for CUDA.
    gpu_runner_image: str = "quay.io/modelpress/runner-cuda:0.1.0"
    runner_command: tuple[str, ...] = ("python", "-m", "modelpress.runner")
    # Namespaces to serve; empty means every namespace (cluster-wide).
    namespaces: tuple[str, ...] = ()
    # Scratch volume kind: one PersistentVolumeClaim per CompressionJob that every pod retry mounts,
    # or emptyDir (node-local disk, lost with each pod; for small models).
    scratch_volume: str = "persistentVolumeClaim"
    scratch_storage_class: str | None = None
    scratch_access_mode: str = "ReadWriteOnce"
    # ConfigMap with a trusted CA bundle (OpenShift AI creates it in every project).
    ca_bundle_configmap: str = "odh-trusted-ca-bundle"
    # A run's wall-clock cap, retries included, when its spec sets none (None: no cap).
    active_deadline_seconds: int | None = 3 * 24 * 3600
    # How long a pod may stay blocked on something only a person can fix (a missing Secret, an
    # image that cannot be pulled, a pod the cluster refuses to create) before the run fails.
    stall_timeout: float = 900.0
    # Seconds between syncs of a running job's status, and before retrying a missing Secret.
    sync_interval: float = 10.0
    retry_delay: float = 30.0
    # Seconds an API call may take before it is given up (and retried by the next sync).
    api_timeout: float = 60.0
    log_tail_lines: int = 50
    metrics_port: int = 8000
    proxy_env: dict[str, str] = field(default_factory=dict)
    # Where spec.serve deploys: "openshift-ai" (connection annotations, a runtime from the platform's
    # vLLM template) or "kserve" (plain KServe: storageUri, the runtime named here or auto-selected).
    serving_platform: ServingPlatform = "openshift-ai"
    serving_runtime: str | None = None
    serving_runtime_template: str = "vllm-cuda-runtime-template"
    serving_template_namespace: str = "redhat-ods-applications"
    # Model Registry: seconds before the first retry (doubling up to the cap), and per attempt.
    registry_retry_delay: float = 10.0
    registry_retry_max: float = 300.0
    registry_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorConfig":
        """Read `MODELPRESS_*` settings and the proxy variables OLM injects."""
        env = dict(os.environ if env is None else env)
        defaults = cls()
        deadline = int(env.get("MODELPRESS_ACTIVE_DEADLINE_SECONDS") or defaults.active_deadline_seconds or 0)
        platform = _choice(env, "MODELPRESS_SERVING_PLATFORM", SERVING_PLATFORMS, defaults.serving_platform)
        return cls(
            runner_image=env.get("MODELPRESS_RUNNER_IMAGE", defaults.runner_image),
            gpu_runner_image=env.get(GPU_IMAGE_SETTING, defaults.gpu_runner_image),
            runner_command=tuple(shlex.split(env.get("MODELPRESS_RUNNER_COMMAND", ""))) or defaults.runner_command,
            namespaces=_split(env.get("MODELPRESS_WATCH_NAMESPACES", "")),
            scratch_volume=_choice(env, "MODELPRESS_SCRATCH_VOLUME", SCRATCH_KINDS, defaults.scratch_volume),
            scratch_storage_class=env.get("MODELPRESS_SCRATCH_STORAGE_CLASS") or None,
            scratch_access_mode=_choice(env, "MODELPRESS_SCRATCH_ACCESS_MODE", ACCESS_MODES, defaults.scratch_access_mode),
            ca_bundle_configmap=env.get("MODELPRESS_CA_BUNDLE_CONFIGMAP", defaults.ca_bundle_configmap),
            active_deadline_seconds=deadline or None,
            stall_timeout=float(env.get("MODELPRESS_STALL_TIMEOUT", defaults.stall_timeout)),
            sync_interval=float(env.get("MODELPRESS_SYNC_INTERVAL", defaults.sync_interval)),
            retry_delay=float(env.get("MODELPRESS_RETRY_DELAY", defaults.retry_delay)),
            api_timeout=float(env.get("MODELPRESS_API_TIMEOUT", defaults.api_timeout)),
            log_tail_lines=int(env.get("MODELPRESS_LOG_TAIL_LINES", defaults.log_tail_lines)),
            metrics_port=int(env.get("MODELPRESS_METRICS_PORT", defaults.metrics_port)),
            proxy_env={key: env[key] for key in PROXY_VARIABLES if env.get(key)},
            serving_platform=cast(ServingPlatform, platform),
            serving_runtime=env.get("MODELPRESS_SERVING_RUNTIME") or None,
            serving_runtime_template=env.get("MODELPRESS_SERVING_RUNTIME_TEMPLATE", defaults.serving_runtime_template),
            serving_template_namespace=env.get("MODELPRESS_SERVING_TEMPLATE_NAMESPACE", defaults.serving_template_namespace),
            registry_retry_delay=float(env.get("MODELPRESS_REGISTRY_RETRY_DELAY", defaults.registry_retry_delay)),
            registry_retry_max=float(env.get("MODELPRESS_REGISTRY_RETRY_MAX", defaults.registry_retry_max)),
            registry_timeout=float(env.get("MODELPRESS_REGISTRY_TIMEOUT", defaults.registry_timeout)),
        )
