"""The test API server: the behaviour kopf and the operator rely on, checked with direct HTTP calls."""

import asyncio
import json

import pytest

from support.kube import NAMESPACE, api, cr_path, create_cr, obj, CR

SPEC = {"model": {"uri": "hf://acme/tiny"}, "recipe": {"preset": "W8A8", "algorithm": "RTN"},
        "output": {"uri": "s3://models/tiny", "connection": "models-s3"}}


@pytest.mark.asyncio
async def test_create_stamps_metadata_and_drops_status(kube) -> None:
    created = await api(kube, "POST", cr_path(), {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                                                 "metadata": {"name": "a", "namespace": NAMESPACE}, "spec": SPEC,
                                                 "status": {"phase": "Succeeded"}})
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0 and "status" not in created


@pytest.mark.asyncio
async def test_status_and_spec_endpoints_are_separate(kube) -> None:
    created = await create_cr(kube, "b", SPEC)
    version = int(created["metadata"]["resourceVersion"])
    await api(kube, "PATCH", cr_path("b"), {"status": {"phase": "Running"}, "metadata": {"labels": {"x": "y"}}})
    stored = obj(kube, CR, "b")
    assert "status" not in stored and stored["metadata"]["labels"] == {"x": "y"}
    assert stored["metadata"]["generation"] == 1 and int(stored["metadata"]["resourceVersion"]) > version
    await api(kube, "PATCH", cr_path("b") + "/status", {"status": {"phase": "Running"}, "spec": {"suspend": True}})
    stored = obj(kube, CR, "b")
    assert stored["status"] == {"phase": "Running"} and stored["spec"]["runtime"]["suspend"] is False
    assert stored["metadata"]["generation"] == 1
    await api(kube, "PATCH", cr_path("b"), {"spec": {"runtime": {"suspend": True}}})
    assert obj(kube, CR, "b")["metadata"]["generation"] == 2


@pytest.mark.asyncio
async def test_failed_json_patch_test_is_a_conflict(kube) -> None:
    await create_cr(kube, "c", SPEC)
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    async with kube.request("PATCH", cr_path("c"), data=json.dumps(stale)) as response:
        assert response.status == 422
    assert "finalizers" not in obj(kube, CR, "c")["metadata"]
    current = obj(kube, CR, "c")["metadata"]["resourceVersion"]
    fresh = [{"op": "test", "path": "/metadata/resourceVersion", "value": current}, stale[1]]
    patched = await api(kube, "PATCH", cr_path("c"), fresh)
    assert patched["metadata"]["finalizers"] == ["x"] and patched["metadata"]["resourceVersion"] != current


@pytest.mark.asyncio
async def test_schema_violations_are_rejected_before_storing(kube) -> None:
    await create_cr(kube, "d", SPEC)
    async with kube.request("PATCH", cr_path("d") + "/status", data=json.dumps({"status": {"phase": "Exploded"}})) as response:
        assert response.status == 422 and "phase" in (await response.json())["message"]
    assert "status" not in obj(kube, CR, "d")


@pytest.mark.asyncio
async def test_list_reports_the_current_version_and_watch_skips_old_objects(kube) -> None:
    await create_cr(kube, "e", SPEC)
    listing = await api(kube, "GET", cr_path())
    version = listing["metadata"]["resourceVersion"]
    assert [item["metadata"]["name"] for item in listing["items"]] == ["e"] and version != "..."
    async with kube.request("GET", cr_path() + f"?watch=true&resourceVersion={version}") as response:
        await create_cr(kube, "f", SPEC)
        line = await asyncio.wait_for(response.content.readline(), timeout=5)
        while not line.strip():
            line = await asyncio.wait_for(response.content.readline(), timeout=5)
        event = json.loads(line)
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "f"


@pytest.mark.asyncio
async def test_pod_logs_are_served_as_text_with_a_tail(kube) -> None:
    kube.pod_logs[(NAMESPACE, "p")] = "one\ntwo\nthree\n"
    async with kube.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/p/log?tailLines=2") as response:
        assert response.status == 200 and await response.text() == "two\nthree\n"


def job_manifest(name: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


@pytest.mark.asyncio
async def test_names_and_labels_are_checked_as_the_api_server_checks_them(kube) -> None:
    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    created = await api(kube, "POST", jobs, job_manifest("a" * 63))
    labels = created["spec"]["template"]["metadata"]["labels"]
    assert labels["batch.kubernetes.io/job-name"] == "a" * 63 and labels["controller-uid"] == created["metadata"]["uid"]
    async with kube.request("POST", jobs, data=json.dumps(job_manifest("a" * 64))) as response:
        assert response.status == 422 and "63 characters" in (await response.json())["message"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NAMESPACE, "labels": {"k": "x" * 64}}}
    async with kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", data=json.dumps(secret)) as response:
        assert response.status == 422


@pytest.mark.asyncio
async def test_creates_can_be_refused_as_a_quota_would(kube) -> None:
    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    kube.refuse("jobs", 403, "Forbidden", "exceeded quota: jobs", times=1)
    async with kube.request("POST", jobs, data=json.dumps(job_manifest("q"))) as response:
        assert response.status == 403 and (await response.json())["message"] == "exceeded quota: jobs"
    assert obj(kube, "batch/v1/jobs", "q") is None
    await api(kube, "POST", jobs, job_manifest("q"))  # refused once only
    assert obj(kube, "batch/v1/jobs", "q") is not None


@pytest.mark.asyncio
async def test_lists_come_in_name_order(kube) -> None:
    for name in ("m", "z", "a"):
        await create_cr(kube, name, SPEC)
    assert [item["metadata"]["name"] for item in (await api(kube, "GET", cr_path()))["items"]] == ["a", "m", "z"]
