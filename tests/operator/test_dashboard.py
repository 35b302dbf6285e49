"""deploy/overlays/openshift-ai: the objects the OpenShift AI dashboard lists, rendered by `kubectl kustomize`."""

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.crd_schema import problems, with_defaults
from support.kustomize import kustomize

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy" / "overlays" / "openshift-ai"
DASHBOARD_NAMESPACE = "redhat-ods-applications"  # OpenShift AI's applications namespace
DASHBOARD_LABELS = {"app": "rhods-dashboard", "app.kubernetes.io/part-of": "rhods-dashboard",
                    "app.opendatahub.io/rhods-dashboard": "true"}
KINDS = {"OdhApplication": "dashboard.opendatahub.io/v1", "OdhDocument": "dashboard.opendatahub.io/v1",
         "OdhQuickStart": "console.openshift.io/v1"}
# The fields the dashboard's OdhApplication CRD requires.
APPLICATION_REQUIRED = ("description", "displayName", "docsLink", "getStartedLink", "getStartedMarkDown", "img", "provider", "support")
REPO_URL = "https://github.com/modelpress/modelpress/blob/main/"


def dashboard_objects() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in kustomize(OVERLAY / "dashboard"):
        by_kind.setdefault(obj["kind"], []).append(obj)
    return by_kind


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def readme_anchors() -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in (REPO / "README.md").read_text().splitlines() if line.startswith("#")}


def test_every_object_has_the_dashboards_kind_namespace_and_labels() -> None:
    by_kind = dashboard_objects()
    assert {kind: len(objs) for kind, objs in by_kind.items()} == {"OdhApplication": 1, "OdhQuickStart": 1, "OdhDocument": 4}
    for kind, objs in by_kind.items():
        for obj in objs:
            assert obj["apiVersion"] == KINDS[kind]
            assert obj["metadata"]["namespace"] == DASHBOARD_NAMESPACE
            assert obj["metadata"]["labels"] == DASHBOARD_LABELS
            assert obj["metadata"]["annotations"]["opendatahub.io/categories"]


def test_the_overlay_adds_the_dashboard_objects_to_the_openshift_operator() -> None:
    objects = kustomize(OVERLAY)
    dashboard = [o for o in objects if o["kind"] in KINDS]
    operator = [o for o in objects if o["kind"] not in KINDS]
    assert len(dashboard) == 6
    assert {o["kind"] for o in operator} >= {"CustomResourceDefinition", "Deployment", "ServiceMonitor", "ClusterRole"}
    # the dashboard's namespace does not leak onto the operator, nor the dashboard's labels
    assert {o["metadata"].get("namespace") for o in operator} <= {None, "modelpress-system"}
    assert not any("app.opendatahub.io/rhods-dashboard" in (o["metadata"].get("labels") or {}) for o in operator)


def test_application_tile() -> None:
    (app,) = dashboard_objects()["OdhApplication"]
    spec = app["spec"]
    assert all(spec.get(field) for field in APPLICATION_REQUIRED)
    assert spec["img"].strip() == (REPO / "deploy" / "icon.svg").read_text().strip()
    (quickstart,) = dashboard_objects()["OdhQuickStart"]
    assert spec["quickStart"] == quickstart["metadata"]["name"]
    assert spec["category"] == "Self-managed"
    for link in (spec["docsLink"], spec["getStartedLink"]):
        assert link.startswith(REPO_URL)


def test_documents_link_to_readme_sections_and_files_that_exist() -> None:
    anchors = readme_anchors()
    (app,) = dashboard_objects()["OdhApplication"]
    docs = dashboard_objects()["OdhDocument"]
    assert {d["spec"]["type"] for d in docs} <= {"documentation", "how-to", "tutorial", "quickstart"}
    links = [d["spec"]["url"] for d in docs] + [app["spec"]["docsLink"], app["spec"]["getStartedLink"]]
    for doc in docs:
        assert doc["spec"]["appName"] == app["metadata"]["name"] and doc["spec"]["displayName"] and doc["spec"]["description"]
    for url in links:
        assert url.startswith(REPO_URL), url
        path, _, anchor = url.removeprefix(REPO_URL).partition("#")
        assert (REPO / path).is_file(), url
        if anchor:
            assert anchor in anchors, f"{url}: README.md has no heading with anchor #{anchor}"
    assert {"on-openshift-ai", "with-gitops"} <= {url.partition("#")[2] for url in links}


def quickstart() -> dict[str, Any]:
    (found,) = dashboard_objects()["OdhQuickStart"]
    return found


def test_quickstart_tasks_have_the_patternfly_shape() -> None:
    qs = quickstart()
    spec = qs["spec"]
    (app,) = dashboard_objects()["OdhApplication"]
    assert spec["appName"] == app["metadata"]["name"] and spec["durationMinutes"] > 0
    assert spec["displayName"] and spec["description"] and spec["introduction"] and spec["conclusion"]
    assert base64.b64decode(spec["icon"].removeprefix("data:image/svg+xml;base64,")) == (REPO / "deploy" / "icon.svg").read_bytes()
    for task in spec["tasks"]:
        assert task["title"] and task["description"]
        assert task["review"]["instructions"] and task["review"]["failedTaskHelp"]
        assert task["summary"]["success"] and task["summary"]["failed"]


def test_quickstart_walks_connection_job_status_then_deployment() -> None:
    titles = [task["title"] for task in quickstart()["spec"]["tasks"]]
    assert titles == ["Create a connection for the compressed model", "Create the CompressionJob", "Watch its status",
                      "Deploy the compressed model from the connection"]


def quickstart_job() -> dict[str, Any]:
    description = quickstart()["spec"]["tasks"][1]["description"]
    (block,) = re.findall(r"```yaml\n(.*?)```", description, flags=re.S)
    return yaml.safe_load(block)


def test_quickstart_job_is_valid_and_the_gitops_example_job(validator: Any) -> None:
    job = quickstart_job()
    assert problems(validator, with_defaults(job)) == []
    (gitops,) = [d for d in yaml.safe_load_all((REPO / "deploy" / "gitops" / "compress" / "compressionjob.yaml").read_text())]
    assert job["spec"] == gitops["spec"] and job["metadata"]["name"] == gitops["metadata"]["name"]


def test_quickstart_names_what_the_job_writes_and_the_deployment_reads() -> None:
    job = quickstart_job()
    tasks = quickstart()["spec"]["tasks"]
    connection, deploy = tasks[0]["description"], tasks[3]["description"]
    assert f"`{job['spec']['output']['connection']}`" in connection and f"`{job['spec']['output']['connection']}`" in deploy
    bucket, _, path = job["spec"]["output"]["uri"].removeprefix("s3://").partition("/")
    assert f"`{path}`" in deploy and f"`{bucket}`" in connection
    assert f"`{job['metadata']['name']}-runner`" in tasks[1]["review"]["instructions"]


@pytest.mark.parametrize("heading", ["On OpenShift AI", "With GitOps"])
def test_readme_has_the_sections_the_dashboard_links_to(heading: str) -> None:
    assert f"## {heading}" in (REPO / "README.md").read_text()
