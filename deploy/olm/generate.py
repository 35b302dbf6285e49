"""Write the OperatorHub bundle (registry+v1) from the sources deploy/ is made of, so the two cannot drift.

    python deploy/olm/generate.py            # make bundle; run it again after changing deploy/base or the spec

The CRD is the spec model's (`modelpress.operator.crd`); the operator's Deployment, the permissions of
its ServiceAccount and the other RBAC come from `kubectl kustomize deploy/base`; the example is
deploy/gitops/compress; the icon deploy/icon.svg. tests/operator/test_olm_bundle.py regenerates the
bundle, compares it with the committed files and checks it against the OLM rules.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from modelpress import __version__
from modelpress.operator.crd import build_crd

REPO = Path(__file__).resolve().parents[2]
OLM = REPO / "deploy" / "olm"
PACKAGE = "modelpress"
CHANNEL = "alpha"
CSV_NAME = f"{PACKAGE}.v{__version__}"
REPOSITORY = "https://github.com/modelpress/modelpress"

ANNOTATIONS = {
    "operators.operatorframework.io.bundle.mediatype.v1": "registry+v1",
    "operators.operatorframework.io.bundle.manifests.v1": "manifests/",
    "operators.operatorframework.io.bundle.metadata.v1": "metadata/",
    "operators.operatorframework.io.bundle.package.v1": PACKAGE,
    "operators.operatorframework.io.bundle.channels.v1": CHANNEL,
    "operators.operatorframework.io.bundle.channel.default.v1": CHANNEL,
}

# What the cluster administrator reads in OperatorHub about the operator's fit (all strings).
FEATURES = {
    "disconnected": "false",  # jobs may pull models from the hub, and images are not pinned by digest yet
    "fips-compliant": "false",
    "proxy-aware": "true",  # the cluster proxy variables OLM injects are passed on to every runner pod
    "tls-profiles": "false",
    "token-auth-aws": "false",
    "token-auth-azure": "false",
    "token-auth-gcp": "false",
    "cnf": "false",
    "cni": "false",
    "csi": "false",
}

DESCRIPTION = """\
ModelPress compresses large language models on OpenShift and Kubernetes into compressed-tensors
checkpoints that vLLM serves as they are.

A **CompressionJob** names a model (`hf://`, `s3://` through an OpenShift AI connection, or `pvc://`),
a recipe (a preset such as W4A16 or W8A8 with GPTQ, AWQ, SmoothQuant or round-to-nearest, or
llm-compressor modifiers) and an output. The operator runs it as a Job on CPUs or GPUs, mirrors its
phase and progress into the job's status, and reports the output URI, the sizes and the quality
measured before and after. The status follows the kstatus conventions (Ready, Reconciling, Stalled),
so Argo CD and Flux can wait for a job.
"""

# The fields of the create form, in order: (path under spec, display name, x-descriptor or None for the
# one the schema's type implies). Descriptions come from the schema when it has one.
SPEC_FIELDS = [
    ("model.uri", "Model", None),
    ("model.tokenSecret.name", "Hugging Face token Secret", "urn:alm:descriptor:io.kubernetes:Secret"),
    ("recipe.preset", "Scheme", None),
    ("recipe.algorithm", "Algorithm", None),
    ("recipe.groupSize", "Group size", None),
    ("calibration.dataset", "Calibration dataset", None),
    ("calibration.numSamples", "Calibration samples", None),
    ("calibration.maxSequenceLength", "Calibration sequence length", None),
    ("output.uri", "Output", None),
    ("output.connection", "Output connection", "urn:alm:descriptor:io.kubernetes:Secret"),
    ("output.overwrite", "Overwrite", None),
    ("runtime.resources.cpu", "CPUs", None),
    ("runtime.resources.memory", "Memory", None),
    ("runtime.resources.gpus", "GPUs", None),
    ("runtime.resources.scratch", "Scratch space", None),
    ("runtime.activeDeadlineSeconds", "Deadline (seconds)", None),
    ("runtime.suspend", "Suspend", None),
]
STATUS_FIELDS = [
    ("phase", "Phase", "urn:alm:descriptor:io.kubernetes.phase"),
    ("conditions", "Conditions", "urn:alm:descriptor:io.kubernetes.conditions"),
    ("progress.stage", "Stage", None),
    ("progress.percent", "Progress (%)", None),
    ("result.uri", "Result", None),
    ("result.ratio", "Compression ratio", None),
    ("failure.reason", "Failure reason", None),
    ("failure.message", "Failure message", None),
    ("jobName", "Runner Job", None),
]
FALLBACK_DESCRIPTIONS = {
    "recipe.preset": "a compressed-tensors scheme: int4 or int8 weights (W4A16, W8A16), int8 or FP8 weights and activations",
    "recipe.algorithm": "how the scheme is reached: GPTQ, AWQ, SmoothQuant+GPTQ, SparseGPT+GPTQ or round-to-nearest (RTN)",
    "calibration.numSamples": "how many calibration samples the algorithm reads",
    "calibration.maxSequenceLength": "tokens per calibration sample",
    "runtime.resources.cpu": "CPU request and limit of the runner pod",
    "runtime.resources.memory": "memory request and limit of the runner pod",
    "runtime.resources.gpus": "GPUs of the runner pod (0: CPUs only)",
    "runtime.activeDeadlineSeconds": "the Job fails with DeadlineExceeded after this many seconds",
    "runtime.suspend": "pause the job (its Job is suspended) until set back to false",
    "phase": "Pending, Queued, Suspended, Running, Succeeded or Failed",
    "conditions": "Succeeded, and Ready, Reconciling and Stalled for GitOps tools",
    "progress.stage": "the runner's current stage",
    "progress.percent": "how far the current stage is",
    "result.uri": "where the compressed model was published",
    "result.ratio": "original size divided by compressed size",
    "failure.reason": "why the job failed, for tools",
    "failure.message": "why the job failed, and the fix",
    "jobName": "the batch/v1 Job that runs the runner",
    "model.tokenSecret.name": "Secret holding the Hugging Face token (hf:// models only)",
}


class _PlainDumper(yaml.SafeDumper):
    """Repeated values in full, and multi-line text (the description, alm-examples) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_PlainDumper.add_representer(str, _text)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False, width=120)


def rendered_base() -> list[dict[str, Any]]:
    """deploy/base as `kubectl apply -k` sends it."""
    done = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy" / "base")], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def schema_node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def x_descriptor(node: dict[str, Any]) -> list[str]:
    """The console widget for a schema node: a select for an enum, else one by its type."""
    if "enum" in node:
        return [f"urn:alm:descriptor:com.tectonic.ui:select:{value}" for value in node["enum"]]
    widget = {"integer": "number", "number": "number", "boolean": "booleanSwitch"}.get(node.get("type"), "text")
    return [f"urn:alm:descriptor:com.tectonic.ui:{widget}"]


def descriptors(schema: dict[str, Any], fields: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    out = []
    for path, display, widget in fields:
        node = schema_node(schema, path)
        out.append({"path": path, "displayName": display,
                    "description": node.get("description") or FALLBACK_DESCRIPTIONS[path],
                    "x-descriptors": [widget] if widget else x_descriptor(node)})
    return out


def owned_crd(crd: dict[str, Any]) -> dict[str, Any]:
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    return {
        "name": crd["metadata"]["name"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
        "displayName": "Compression Job",
        "description": schema["description"],
        "resources": [{"kind": "Job", "name": "", "version": "v1"}, {"kind": "Pod", "name": "", "version": "v1"}],
        "specDescriptors": descriptors(schema["properties"]["spec"], SPEC_FIELDS),
        "statusDescriptors": descriptors(schema["properties"]["status"], STATUS_FIELDS),
    }


def image_name(image: str) -> str:
    """quay.io/modelpress/runner-cuda:0.1.0 -> runner-cuda: the relatedImages name, the image's own
    (the name Makefile `images` builds it under)."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def related_images(deployment: dict[str, Any]) -> list[dict[str, str]]:
    """Every image the operator runs or starts: its containers' and every `*_IMAGE` setting's (the CPU and CUDA runners)."""
    found: list[tuple[str, str]] = []
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        found.append((image_name(container["image"]), container["image"]))
        found += [(image_name(e["value"]), e["value"]) for e in container.get("env", []) if e["name"].endswith("_IMAGE") and "value" in e]
    unique: dict[str, str] = {}
    for name, image in found:
        if image not in unique.values():
            unique[name] = image
    return [{"name": name, "image": image} for name, image in unique.items()]


def permissions(objects: list[dict[str, Any]], account: str, binding_kind: str, role_kind: str) -> list[dict[str, Any]]:
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == role_kind}
    found = []
    for binding in (o for o in objects if o["kind"] == binding_kind):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in binding.get("subjects", [])):
            found.append({"serviceAccountName": account, "rules": roles[binding["roleRef"]["name"]]["rules"]})
    return found


def example() -> dict[str, Any]:
    (job,) = [d for d in yaml.safe_load_all((REPO / "deploy" / "gitops" / "compress" / "compressionjob.yaml").read_text()) if d]
    job["metadata"] = {"name": job["metadata"]["name"]}
    return job


def build_bundle() -> dict[str, str]:
    """Every bundle file, by its path under deploy/olm/."""
    objects = rendered_base()
    known = {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
             "Role", "RoleBinding", "Deployment", "Service"}
    unknown = sorted({o["kind"] for o in objects} - known)
    if unknown:
        raise SystemExit(f"deploy/olm/generate.py: deploy/base has {', '.join(unknown)}; decide where it goes in the bundle")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    crd = build_crd()
    images = related_images(deployment)
    cluster_permissions = permissions(objects, account, "ClusterRoleBinding", "ClusterRole")
    bound = {o["roleRef"]["name"] for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")
             and any(s.get("name") == account for s in o.get("subjects", []))}
    # Roles nobody's ServiceAccount is bound to (the aggregated edit/view roles) and the Service ship as they are.
    extra = [o for o in objects if o["kind"] in ("ClusterRole", "Role", "Service") and o["metadata"]["name"] not in bound]
    csv = {
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": CSV_NAME,
            "annotations": {
                "alm-examples": json.dumps([example()], indent=2),
                "capabilities": "Basic Install",
                "categories": "AI/Machine Learning",
                "containerImage": deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                "description": "Compress LLMs into compressed-tensors checkpoints that vLLM serves, as Kubernetes jobs.",
                "repository": REPOSITORY,
                "support": "ModelPress",
                "operatorframework.io/suggested-namespace": deployment["metadata"]["namespace"],
                **{f"features.operators.openshift.io/{key}": value for key, value in FEATURES.items()},
            },
        },
        "spec": {
            "displayName": "ModelPress",
            "description": DESCRIPTION,
            "version": __version__,
            "maturity": CHANNEL,
            "minKubeVersion": "1.25.0",  # the CRD's CEL validation rules
            "provider": {"name": "ModelPress", "url": REPOSITORY},
            "maintainers": [{"name": "ModelPress", "email": "dev@modelpress.dev"}],
            "links": [{"name": "Documentation", "url": f"{REPOSITORY}/blob/main/README.md"},
                      {"name": "On OpenShift AI", "url": f"{REPOSITORY}/blob/main/README.md#on-openshift-ai"}],
            "keywords": ["llm", "quantization", "compression", "vllm", "gptq", "awq", "openshift-ai"],
            "icon": [{"base64data": base64.b64encode((REPO / "deploy" / "icon.svg").read_bytes()).decode(), "mediatype": "image/svg+xml"}],
            # The operator runs cluster-wide (--all-namespaces, a ClusterRole): OLM's per-namespace modes are not offered.
            "installModes": [{"type": "OwnNamespace", "supported": False}, {"type": "SingleNamespace", "supported": False},
                             {"type": "MultiNamespace", "supported": False}, {"type": "AllNamespaces", "supported": True}],
            "install": {"strategy": "deployment", "spec": {
                "clusterPermissions": cluster_permissions,
                "permissions": permissions(objects, account, "RoleBinding", "Role"),
                "deployments": [{"name": deployment["metadata"]["name"], "label": deployment["metadata"].get("labels", {}),
                                 "spec": deployment["spec"]}],
            }},
            "customresourcedefinitions": {"owned": [owned_crd(crd)]},
            "relatedImages": images,
        },
    }
    header = "# Generated by deploy/olm/generate.py from deploy/base and the spec model; do not edit by hand.\n"
    files = {
        f"manifests/{PACKAGE}.clusterserviceversion.yaml": header + dump(csv),
        f"manifests/{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml": header + dump(crd),
        "metadata/annotations.yaml": header + dump({"annotations": ANNOTATIONS}),
        "bundle.Dockerfile": header + "FROM scratch\n"
                             + "".join(f"LABEL {key}={value}\n" for key, value in ANNOTATIONS.items())
                             + "COPY manifests /manifests/\nCOPY metadata /metadata/\n",
    }
    for obj in extra:
        metadata = {k: v for k, v in obj["metadata"].items() if k != "namespace"}  # OLM installs it in the operator's namespace
        clean = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": metadata,
                 **{k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}}
        files[f"manifests/{obj['metadata']['name']}.{obj['kind'].lower()}.yaml"] = header + dump(clean)
    return files


def main() -> None:
    files = build_bundle()
    for stale in [p for p in (OLM / "manifests").glob("*") if f"manifests/{p.name}" not in files]:
        stale.unlink()
    for path, text in files.items():
        (OLM / path).parent.mkdir(parents=True, exist_ok=True)
        (OLM / path).write_text(text)
    sys.stdout.write("".join(f"wrote deploy/olm/{path}\n" for path in files))


if __name__ == "__main__":
    main()
