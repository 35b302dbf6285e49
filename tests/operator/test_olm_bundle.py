"""deploy/olm: the OperatorHub bundle is what deploy/olm/generate.py makes from deploy/ and the spec model,
and it keeps the rules OLM installs by (registry+v1: annotations, one CSV, owned CRDs, images)."""

import base64
import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from modelpress.operator.crd import build_crd
from support.kustomize import kustomize

REPO = Path(__file__).resolve().parents[2]
OLM = REPO / "deploy" / "olm"
INSTALL_MODES = {"OwnNamespace", "SingleNamespace", "MultiNamespace", "AllNamespaces"}
CAPABILITIES = {"Basic Install", "Seamless Upgrades", "Full Lifecycle", "Deep Insights", "Auto Pilot"}
FEATURES = ("disconnected", "fips-compliant", "proxy-aware", "tls-profiles", "token-auth-aws", "token-auth-azure", "token-auth-gcp")
SEMVER = r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("olm_generate", OLM / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_has(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return False
    return True


def images_started(deployment: dict[str, Any]) -> set[str]:
    """Every image a deployment names: its containers' and every `*_IMAGE` setting's."""
    pod = deployment["spec"]["template"]["spec"]
    found = set()
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        found.add(container["image"])
        found |= {e["value"] for e in container.get("env", []) if e["name"].endswith("_IMAGE") and "value" in e}
    return found


def bundle_problems(root: Path) -> list[str]:
    """What OLM (and the OpenShift console) would refuse or mis-show in the bundle at `root`."""
    found: list[str] = []
    annotations = yaml.safe_load((root / "metadata" / "annotations.yaml").read_text())["annotations"]
    prefix = "operators.operatorframework.io.bundle."
    expected = {"mediatype.v1": "registry+v1", "manifests.v1": "manifests/", "metadata.v1": "metadata/"}
    found += [f"annotations.yaml: {prefix}{key} must be {value}" for key, value in expected.items() if annotations.get(prefix + key) != value]
    channels = (annotations.get(prefix + "channels.v1") or "").split(",")
    if not annotations.get(prefix + "package.v1") or annotations.get(prefix + "channel.default.v1") not in channels:
        found.append("annotations.yaml: a package and a default channel among the channels are required")

    manifests = [doc for path in sorted((root / "manifests").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    csvs = [m for m in manifests if m.get("kind") == "ClusterServiceVersion"]
    if len(csvs) != 1:
        return found + [f"manifests/: exactly one ClusterServiceVersion, found {len(csvs)}"]
    (csv,) = csvs
    crds = {m["metadata"]["name"]: m for m in manifests if m.get("kind") == "CustomResourceDefinition"}
    spec, meta = csv["spec"], csv["metadata"]
    if csv.get("apiVersion") != "operators.coreos.com/v1alpha1":
        found.append("CSV: apiVersion must be operators.coreos.com/v1alpha1")
    for field in ("displayName", "description", "version", "maturity", "provider", "installModes", "install", "icon"):
        if not spec.get(field):
            found.append(f"CSV: spec.{field} is required")
    if not re.match(SEMVER, str(spec.get("version", ""))) or meta["name"] != f"{annotations.get(prefix + 'package.v1')}.v{spec.get('version')}":
        found.append("CSV: metadata.name must be <package>.v<semver spec.version>")
    modes = {m["type"]: m["supported"] for m in spec.get("installModes", [])}
    if set(modes) != INSTALL_MODES or not all(isinstance(v, bool) for v in modes.values()) or not any(modes.values()):
        found.append("CSV: installModes must list all four modes, each supported true or false, one at least true")
    for icon in spec.get("icon", []):
        if icon.get("mediatype") not in ("image/svg+xml", "image/png") or not base64.b64decode(icon.get("base64data", "")):
            found.append("CSV: every icon needs base64data and an image mediatype")

    notes = meta.get("annotations") or {}
    if notes.get("capabilities") not in CAPABILITIES:
        found.append(f"CSV: capabilities must be one of {sorted(CAPABILITIES)}")
    for key in ("categories", "containerImage", "description"):
        if not notes.get(key):
            found.append(f"CSV: metadata.annotations.{key} is required")
    for feature in FEATURES:
        if notes.get(f"features.operators.openshift.io/{feature}") not in ("true", "false"):
            found.append(f"CSV: features.operators.openshift.io/{feature} must be the string true or false")

    install = spec.get("install", {})
    deployments = install.get("spec", {}).get("deployments") or []
    if install.get("strategy") != "deployment" or not deployments:
        found.append("CSV: install.strategy deployment with at least one deployment is required")
    accounts = {d["spec"]["template"]["spec"].get("serviceAccountName") for d in deployments}
    for kind in ("clusterPermissions", "permissions"):
        for grant in install.get("spec", {}).get(kind) or []:
            if grant.get("serviceAccountName") not in accounts or not grant.get("rules"):
                found.append(f"CSV: {kind} must grant rules to a deployment's serviceAccountName")
    if notes.get("containerImage") not in {c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]}:
        found.append("CSV: containerImage must be the operator's image")

    related = {entry["image"] for entry in spec.get("relatedImages") or []}
    if len(related) != len(spec.get("relatedImages") or []) or len({e["name"] for e in spec.get("relatedImages") or []}) != len(related):
        found.append("CSV: relatedImages names and images must be unique")
    for deployment in deployments:
        for image in sorted(images_started(deployment) - related):
            found.append(f"CSV: image {image} is not in relatedImages")

    owned = spec.get("customresourcedefinitions", {}).get("owned") or []
    if not owned:
        found.append("CSV: customresourcedefinitions.owned is empty")
    owned_kinds = set()
    for entry in owned:
        crd = crds.get(entry.get("name"))
        if crd is None:
            found.append(f"CSV: owned CRD {entry.get('name')} has no manifest in manifests/")
            continue
        versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
        if entry.get("version") not in versions or entry.get("kind") != crd["spec"]["names"]["kind"]:
            found.append(f"CSV: owned CRD {entry['name']} version/kind must be one the CRD serves ({sorted(versions)}, {crd['spec']['names']['kind']})")
            continue
        if not entry.get("displayName") or not entry.get("description"):
            found.append(f"CSV: owned CRD {entry['name']} needs a displayName and a description")
        owned_kinds.add((f"{crd['spec']['group']}/{entry['version']}", entry["kind"]))
        schema = versions[entry["version"]]["schema"]["openAPIV3Schema"]["properties"]
        for section in ("spec", "status"):
            for descriptor in entry.get(f"{section}Descriptors") or []:
                if not schema_has(schema[section], descriptor["path"]) or not descriptor.get("x-descriptors"):
                    found.append(f"CSV: {section}Descriptor {descriptor['path']} is not a field of {entry['name']}")
    for name in sorted(set(crds) - {entry.get("name") for entry in owned}):
        found.append(f"manifests/: CRD {name} is not owned by the CSV")
    try:
        examples = json.loads(notes.get("alm-examples", ""))
    except json.JSONDecodeError:
        return found + ["CSV: alm-examples must be a JSON list"]
    for example in examples:
        if (example.get("apiVersion"), example.get("kind")) not in owned_kinds:
            found.append(f"CSV: alm-examples has a {example.get('kind')} that no owned CRD defines")
    return found


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    shutil.copytree(OLM / "manifests", tmp_path / "manifests")
    shutil.copytree(OLM / "metadata", tmp_path / "metadata")
    return tmp_path


def csv_path(root: Path) -> Path:
    return root / "manifests" / "modelpress.clusterserviceversion.yaml"


def edit_csv(root: Path, change: Any) -> None:
    text = csv_path(root).read_text()
    csv = yaml.safe_load(text)
    change(csv)
    csv_path(root).write_text(yaml.safe_dump(csv, sort_keys=False))


def test_bundle_is_what_the_generator_makes_from_deploy() -> None:
    files = generator().build_bundle()
    committed = {str(p.relative_to(OLM)) for p in OLM.rglob("*") if p.is_file() and p.name != "generate.py" and "__pycache__" not in p.parts}
    assert committed == set(files), "run: python deploy/olm/generate.py"
    for path, text in files.items():
        assert (OLM / path).read_text() == text, f"deploy/olm/{path} is stale; run: python deploy/olm/generate.py"


def test_bundle_keeps_the_olm_rules() -> None:
    assert bundle_problems(OLM) == []


def test_a_bundle_without_its_owned_crd_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifests" / "modelpress.dev_compressionjobs.yaml").unlink()
    found = bundle_problems(bundle_copy)
    assert found[0] == "CSV: owned CRD compressionjobs.modelpress.dev has no manifest in manifests/"
    assert found[1:] == ["CSV: alm-examples has a CompressionJob that no owned CRD defines"]


@pytest.mark.parametrize("change, problem", [
    (lambda c: c["spec"]["relatedImages"].pop(1), "CSV: image quay.io/modelpress/runner:0.1.0 is not in relatedImages"),
    (lambda c: c["spec"]["customresourcedefinitions"]["owned"][0].update(version="v1"), "CSV: owned CRD compressionjobs.modelpress.dev version/kind"),
    (lambda c: c["spec"]["installModes"].pop(0), "CSV: installModes must list all four modes"),
    (lambda c: c["spec"]["customresourcedefinitions"]["owned"][0]["specDescriptors"][0].update(path="model.url"),
     "CSV: specDescriptor model.url is not a field"),
    (lambda c: c["metadata"]["annotations"].update({"features.operators.openshift.io/disconnected": False}),
     "CSV: features.operators.openshift.io/disconnected must be the string"),
    (lambda c: c["spec"].pop("displayName"), "CSV: spec.displayName is required"),
])
def test_the_rules_catch_a_broken_csv(bundle_copy: Path, change: Any, problem: str) -> None:
    edit_csv(bundle_copy, change)
    found = bundle_problems(bundle_copy)
    assert found and found[0].startswith(problem), found


def test_csv_installs_the_deployment_and_rbac_of_deploy_base() -> None:
    csv = yaml.safe_load(csv_path(OLM).read_text())
    base = {(o["kind"], o["metadata"]["name"]): o for o in kustomize(REPO / "deploy" / "base")}
    (deployment,) = csv["spec"]["install"]["spec"]["deployments"]
    assert deployment["spec"] == base["Deployment", deployment["name"]]["spec"]
    (grant,) = csv["spec"]["install"]["spec"]["clusterPermissions"]
    assert grant["rules"] == base["ClusterRole", "modelpress-operator"]["rules"]
    assert grant["serviceAccountName"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    shipped = {(d["kind"], d["metadata"]["name"]) for p in (OLM / "manifests").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())}
    assert {("ClusterRole", "modelpress-compressionjobs-edit"), ("ClusterRole", "modelpress-compressionjobs-view"),
            ("Service", "modelpress-operator-metrics")} <= shipped
    assert yaml.safe_load((OLM / "manifests" / "modelpress.dev_compressionjobs.yaml").read_text()) == build_crd()


def test_related_images_are_the_images_make_builds() -> None:
    csv = yaml.safe_load(csv_path(OLM).read_text())
    related = {entry["name"]: entry["image"] for entry in csv["spec"]["relatedImages"]}
    assert set(related) == {"operator", "runner", "runner-cuda"}
    makefile = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+) := (.+)$", makefile, flags=re.M))
    recipe = makefile.split("\nimages:", 1)[1].split("\n\n", 1)[0]
    built = {variables[name] for name in re.findall(r"-t \$\(([A-Z_]+)\)", recipe)}
    assert built == set(related.values())
    assert ("--target runner --build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX_URL) --build-arg VLLM_VERSION=$(VLLM_VERSION) "
            "-t $(RUNNER_CUDA_IMAGE)") in recipe


def test_example_and_form_come_from_the_spec() -> None:
    csv = yaml.safe_load(csv_path(OLM).read_text())
    (example,) = json.loads(csv["metadata"]["annotations"]["alm-examples"])
    gitops = yaml.safe_load((REPO / "deploy" / "gitops" / "compress" / "compressionjob.yaml").read_text())
    assert example["spec"] == gitops["spec"]
    (owned,) = csv["spec"]["customresourcedefinitions"]["owned"]
    by_path = {d["path"]: d for d in owned["specDescriptors"]}
    assert by_path["recipe.preset"]["x-descriptors"][0] == "urn:alm:descriptor:com.tectonic.ui:select:W4A16"
    assert by_path["output.connection"]["x-descriptors"] == ["urn:alm:descriptor:io.kubernetes:Secret"]
    assert by_path["runtime.suspend"]["x-descriptors"] == ["urn:alm:descriptor:com.tectonic.ui:booleanSwitch"]
    status = {d["path"]: d["x-descriptors"] for d in owned["statusDescriptors"]}
    assert status["conditions"] == ["urn:alm:descriptor:io.kubernetes.conditions"]
    assert status["phase"] == ["urn:alm:descriptor:io.kubernetes.phase"]
