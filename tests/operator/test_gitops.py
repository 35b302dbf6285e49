"""deploy/gitops: the Argo CD health check run as Argo CD runs it (Lua 5.1, through lupa), where it is
installed (argocd-cm, OpenShift GitOps), and the Argo CD and Flux examples that compress then serve."""

import re
from pathlib import Path
from typing import Any, get_args

import lupa.lua51 as lupa
import pytest
import yaml

from modelpress.contract import EXIT_REASONS, FailureReason, parse_job, parse_uri
from modelpress.operator.config import OperatorConfig
from modelpress.operator.job_builder import build_job
from modelpress.operator.status import Observation
from modelpress.operator.validation import parse
from support.crd_schema import problems, with_defaults
from support.job_states import FAILURES, STATES, compression_job
from support.kustomize import kustomize

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "deploy" / "gitops"
CHECK = GITOPS / "argocd" / "resource_customizations" / "modelpress.dev" / "CompressionJob"
SCRIPT = (CHECK / "health.lua").read_text()
CM_KEY = "resource.customizations.health.modelpress.dev_CompressionJob"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# What Argo CD shows for each state the operator writes.
EXPECTED = {
    "new": "Progressing", "waiting-for-reference": "Progressing", "pending": "Progressing",
    "pending-image-pull": "Degraded", "queued": "Progressing", "suspended": "Suspended",
    "running": "Progressing", "succeeded": "Healthy", "succeeded-spec-changed": "Progressing",
    **{f"failed-{reason}": "Degraded" for reason in FAILURES},
}


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD's contract: the object as the global `obj`, the script's returned table as the verdict."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    run = lua.eval("function(obj, script) _G.obj = obj; return assert(loadstring(script, 'health.lua'))() end")
    verdict = run(lua.table_from(obj, recursive=True), SCRIPT)
    return {"status": verdict["status"], "message": verdict["message"]}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_runs_as_lua_5_1_like_argo_cd() -> None:
    assert lupa.LuaRuntime().lua_version == (5, 1)  # gopher-lua, Argo CD's interpreter, is Lua 5.1
    # Argo CD's sandbox has no io, os or require: the script uses none of them.
    assert not re.search(r"\b(io|os|require|dofile|loadfile)\b\s*[.(]", SCRIPT)


@pytest.mark.parametrize("case", yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"],
                         ids=lambda case: Path(case["inputPath"]).stem)
def test_health_test_yaml_cases(case: dict[str, Any]) -> None:
    sample = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert health(sample) == case["healthStatus"]


def test_samples_cover_every_state_and_are_valid_objects(validator: Any) -> None:
    cases = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
    assert sorted(Path(c["inputPath"]).stem for c in cases) == sorted(STATES) == sorted(p.stem for p in (CHECK / "testdata").glob("*.yaml"))
    for path in (CHECK / "testdata").glob("*.yaml"):
        assert problems(validator, yaml.safe_load(path.read_text())) == [], path.name


@pytest.mark.parametrize("state", sorted(STATES))
def test_every_state_the_operator_writes_gets_its_argo_status(state: str) -> None:
    verdict = health(STATES[state]())
    assert verdict["status"] == EXPECTED[state] and verdict["status"] in ARGO_STATUSES
    assert verdict["message"]
    if state.startswith("failed-"):
        assert verdict["message"].startswith(state.removeprefix("failed-") + ": ")


REASONS = sorted({*get_args(FailureReason), *EXIT_REASONS.values(), *FAILURES})


@pytest.mark.parametrize("reason", REASONS)
def test_each_failure_reason_is_degraded_with_reason_and_message(reason: str) -> None:
    resource = compression_job(Observation(phase="Failed", reason=reason, message="what went wrong, and the fix"))
    assert health(resource) == {"status": "Degraded", "message": f"{reason}: what went wrong, and the fix"}


def test_running_shows_stage_percent_and_layer() -> None:
    assert health(STATES["running"]()) == {"status": "Progressing", "message": "Running: compress 41%, layer 12 of 30"}


def test_status_from_an_older_operator_without_kstatus_conditions() -> None:
    for state, expected in (("running", "Progressing"), ("succeeded", "Healthy"), ("failed-OOMKilled", "Degraded")):
        resource = STATES[state]()
        resource["status"]["conditions"] = [c for c in resource["status"]["conditions"] if c["type"] == "Succeeded"]
        assert health(resource)["status"] == expected


def test_argocd_cm_carries_the_script_under_argo_cds_key() -> None:
    (cm,) = kustomize(GITOPS / "argocd")
    assert (cm["apiVersion"], cm["kind"], cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("v1", "ConfigMap", "argocd-cm", "argocd")
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"  # Argo CD only reads its labelled argocd-cm
    assert cm["data"] == {CM_KEY: SCRIPT}


def test_openshift_gitops_patch_carries_the_same_script() -> None:
    (patch,) = documents(GITOPS / "argocd" / "openshift-gitops-patch.yaml")
    assert (patch["apiVersion"], patch["kind"]) == ("argoproj.io/v1beta1", "ArgoCD")
    assert patch["spec"]["resourceHealthChecks"] == [{"group": "modelpress.dev", "kind": "CompressionJob", "check": SCRIPT}]


def example() -> tuple[dict[str, Any], dict[str, Any]]:
    objects = {o["kind"]: o for o in kustomize(GITOPS)}
    assert set(objects) == {"CompressionJob", "InferenceService"}
    return objects["CompressionJob"], objects["InferenceService"]


def sync_wave(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])


def test_example_compresses_first_then_serves_what_it_wrote(validator: Any) -> None:
    job, isvc = example()
    assert sync_wave(job) < sync_wave(isvc)
    assert problems(validator, with_defaults(job)) == []
    spec = parse_job(job).spec
    output = parse_uri(spec.output.uri)
    connection = documents(REPO / "deploy" / "examples" / "s3-connection.yaml")[0]
    assert isvc["metadata"]["annotations"]["opendatahub.io/connections"] == spec.output.connection == connection["metadata"]["name"]
    assert output.root == connection["stringData"]["AWS_S3_BUCKET"]
    assert isvc["metadata"]["annotations"]["opendatahub.io/connection-path"] == output.path
    assert isvc["spec"]["predictor"]["model"]["modelFormat"] == {"name": "vLLM"}
    cr = {**with_defaults(job), "metadata": {**job["metadata"], "namespace": "my-project", "uid": "0f0f0f0f-0000-4000-8000-000000000000"}}
    assert build_job(cr, parse(cr), OperatorConfig())["metadata"]["name"] == "qwen2-0-5b-w4a16-runner"


def test_argo_cd_application_syncs_the_example() -> None:
    (app,) = documents(GITOPS / "argocd" / "application.yaml")
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert (REPO / app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    assert app["spec"]["source"]["path"] == "deploy/gitops"


def test_flux_waits_for_the_job_then_serves() -> None:
    docs = documents(GITOPS / "flux" / "kustomizations.yaml")
    source = next(d for d in docs if d["kind"] == "GitRepository")
    compress, serve = (d for d in docs if d["kind"] == "Kustomization")
    job, isvc = example()
    for kustomization, kind in ((compress, "CompressionJob"), (serve, "InferenceService")):
        assert kustomization["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
        assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
        assert [o["kind"] for o in kustomize(REPO / kustomization["spec"]["path"])] == [kind]
    assert compress["spec"]["healthChecks"] == [{"apiVersion": job["apiVersion"], "kind": "CompressionJob",
                                                 "name": job["metadata"]["name"], "namespace": compress["spec"]["targetNamespace"]}]
    assert serve["spec"]["dependsOn"] == [{"name": compress["metadata"]["name"]}]
    # Flux's timeout bounds the health check: it must outlast the job's own deadline.
    hours = int(compress["spec"]["timeout"].removesuffix("h"))
    assert hours * 3600 >= job["spec"]["runtime"]["activeDeadlineSeconds"]
