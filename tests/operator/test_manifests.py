"""Every object the operator builds and every manifest in deploy/ against the Kubernetes OpenAPI
schemas, offline (kubernetes-validate, strict: an unknown or misplaced field is an error)."""

from typing import Any

import kubernetes_validate
import pytest

from support.crd_schema import with_defaults
from support.deploy import DEPLOY, documents, rendered
from modelpress.operator.config import OperatorConfig
from modelpress.operator.job_builder import build_claim, build_job
from modelpress.operator.validation import parse

# The oldest release the Job relies on (podFailurePolicy, podReplacementPolicy), and the newest known.
VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Kinds whose schemas come with their operators, not with Kubernetes.
FOREIGN_KINDS = {"ServiceMonitor"}

SPECS: dict[str, dict[str, Any]] = {
    "cpu-s3": {"model": {"uri": "s3://base/llama", "connection": "src"}, "recipe": {"preset": "W8A8", "algorithm": "RTN"},
               "output": {"uri": "s3://models/llama-w8a8", "connection": "dst"}},
    "gpu-hub-to-pvc": {"model": {"uri": "hf://acme/llama", "tokenSecret": {"name": "hf", "key": "HF_TOKEN"}},
                       "recipe": {"configMap": {"name": "recipes", "key": "gptq.yaml"}},
                       "calibration": {"dataset": "self-generated"}, "output": {"uri": "pvc://out/llama"},
                       "runtime": {"resources": {"gpus": 2}, "nodeSelector": {"nvidia.com/gpu.present": "true"},
                                   "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                   "priorityClassName": "batch", "ttlSecondsAfterFinished": 60,
                                   "scratchVolume": {"storageClassName": "fast", "accessMode": "ReadWriteOncePod"}}},
}
CONFIGS = {"claim": OperatorConfig(proxy_env={"HTTPS_PROXY": "http://proxy:3128"}), "emptyDir": OperatorConfig(scratch_volume="emptyDir")}


def problems(obj: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{obj['kind']} {obj['metadata'].get('name')}: {'.'.join(map(str, err.path))}: {err.message}"
    return None


def body(spec: dict[str, Any]) -> dict[str, Any]:
    return with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                          "metadata": {"name": "llama", "namespace": "ml", "uid": "0f0f0f0f-0000-4000-8000-000000000000"},
                          "spec": spec})


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("ca_keys", [set(), {"ca-bundle.crt", "odh-ca-bundle.crt"}], ids=["no-ca", "both-cas"])
def test_the_job_and_the_claim_validate(spec: str, config: str, version: str, ca_keys: set[str]) -> None:
    cr = body(SPECS[spec])
    job = build_job(cr, parse(cr), CONFIGS[config], ca_keys)
    assert problems(job, version) is None
    assert problems(build_claim(cr, parse(cr), CONFIGS[config]), version) is None


def test_a_misplaced_field_is_caught() -> None:
    cr = body(SPECS["cpu-s3"])
    job = build_job(cr, parse(cr), OperatorConfig())
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["request"] = {"cpu": "1"}
    assert "request" in (problems(job, VERSIONS[-1]) or "")


def deploy_objects() -> list[dict[str, Any]]:
    """Every object of the base and of the OpenShift overlay (its Deployment patched), and the examples."""
    objects = rendered(DEPLOY) + rendered(DEPLOY / "overlays" / "openshift")
    objects += [d for path in sorted((DEPLOY / "examples").glob("*.yaml")) for d in documents(path) if d["kind"] != "CompressionJob"]
    return [o for o in objects if o["kind"] not in FOREIGN_KINDS]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_deploy_manifest_validates(version: str) -> None:
    objects = deploy_objects()
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "ClusterRoleBinding", "Secret"} <= {o["kind"] for o in objects}
    patched = [o for o in objects if o["kind"] == "Deployment" and "volumes" in o["spec"]["template"]["spec"]]
    assert patched, "the OpenShift overlay's Deployment, with its patch merged"
    assert [p for p in (problems(o, version) for o in objects) if p] == []
