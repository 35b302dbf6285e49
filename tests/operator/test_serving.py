"""After success: the published connection and the served model, built (pure) and made by the running operator."""

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpress.operator import serving
from modelpress.operator.config import OperatorConfig
from modelpress.operator.registry import registration
from modelpress.operator.validation import parse
from support.crd_schema import problems, with_defaults
from support.delivery import (DELIVERY, RUNTIME_IMAGE, S3_KEYS, SPEC, TEMPLATE, condition, decoded, preload, set_isvc_status,
                              status_of, succeed)
from support.kube import CR, ISVCS, NAMESPACE, RUNTIMES, SECRETS, api, cr_path, create_cr, create_secret, eventually, obj, operator_running

UID = "0f0f0f0f-0000-4000-8000-000000000000"
CONNECTION_TYPES = {"opendatahub.io/connection-type-protocol": "s3", "opendatahub.io/connection-type-ref": "s3",
                    "opendatahub.io/connection-type": "s3"}
OWNED = {"app.kubernetes.io/managed-by": "modelpress-operator", "app.kubernetes.io/part-of": "modelpress",
         "modelpress.dev/compressionjob-name": "tiny"}
SERVE = {"args": ["--max-model-len=4096"], "resources": {"gpus": 1, "memory": "24Gi"}}


def spec(**extra: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    for key, value in extra.items():
        if key == "publishConnection":
            out["output"]["publishConnection"] = value
        else:
            out[key] = value
    return out


def body(name: str = "tiny", **extra: Any) -> dict[str, Any]:
    cr = with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                        "metadata": {"name": name, "namespace": NAMESPACE, "uid": UID}, "spec": spec(**extra)})
    return cr


# --- the builders ------------------------------------------------------------------------------------------


def test_published_connection_has_the_keys_labels_and_annotations_the_dashboard_reads() -> None:
    cr = body(publishConnection={"displayName": "Tiny Llama int4"})
    source = {key: serving._b64(value) for key, value in {**S3_KEYS, "AWS_S3_USE_PATH_STYLE": "true", "EXTRA": "x"}.items()}
    secret = serving.published_connection(cr, parse(cr), source, "W4A16 GPTQ g64")
    assert secret["type"] == "Opaque" and secret["metadata"]["name"] == "tiny" and secret["metadata"]["namespace"] == NAMESPACE
    assert decoded(secret) == {**S3_KEYS, "AWS_S3_BUCKET": "models", "AWS_S3_USE_PATH_STYLE": "true"}
    assert secret["metadata"]["labels"] == {"opendatahub.io/dashboard": "true", "opendatahub.io/managed": "true", **OWNED}
    assert secret["metadata"]["annotations"] == {
        "openshift.io/display-name": "Tiny Llama int4",
        "openshift.io/description": "W4A16 GPTQ g64 of hf://acme/tiny-llama, compressed by CompressionJob ml/tiny",
        **CONNECTION_TYPES, "modelpress.dev/compressionjob-uid": UID}
    assert "ownerReferences" not in secret["metadata"]
    owned = body(publishConnection={"name": "tiny-out", "deleteWithJob": True})
    secret = serving.published_connection(owned, parse(owned), source, "W4A16")
    assert secret["metadata"]["name"] == "tiny-out"
    assert secret["metadata"]["annotations"]["openshift.io/display-name"] == "tiny-llama-w4a16"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == UID


def test_isvc_for_openshift_ai_points_at_the_connection() -> None:
    cr = body(serve={**SERVE, "replicas": 2})
    isvc = serving.inference_service(cr, parse(cr), "openshift-ai", "tiny", "tiny-conn")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["labels"] == {"opendatahub.io/dashboard": "true", **OWNED}
    assert isvc["metadata"]["annotations"] == {
        "openshift.io/display-name": "tiny-llama-w4a16", "serving.kserve.io/deploymentMode": "RawDeployment",
        "opendatahub.io/connections": "tiny-conn", "opendatahub.io/connection-path": "compressed/tiny-llama-w4a16",
        "modelpress.dev/compressionjob-uid": UID}
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 2
    assert predictor["model"] == {
        "modelFormat": {"name": "vLLM"}, "runtime": "tiny", "args": ["--max-model-len=4096"],
        "resources": {"requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"},
                      "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"}}}
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "ownerReferences" not in isvc["metadata"]


def test_isvc_for_plain_kserve_and_pvc_outputs_uses_storage_uri() -> None:
    cr = body(serve={"deploymentMode": "Serverless", "serviceAccountName": "s3-reader", "deleteWithJob": True,
                     "resources": {"gpus": 0}})
    isvc = serving.inference_service(cr, parse(cr), "kserve", None, None)
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == "s3://models/compressed/tiny-llama-w4a16" and "runtime" not in model
    assert not {"opendatahub.io/connections", "opendatahub.io/connection-path"} & set(isvc["metadata"]["annotations"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "s3-reader" and "tolerations" not in isvc["spec"]["predictor"]
    assert "nvidia.com/gpu" not in model["resources"]["limits"]
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == UID
    pvc = body(serve={})
    pvc["spec"]["output"] = {"uri": "pvc://models/tiny-w4a16"}
    isvc = serving.inference_service(pvc, parse(pvc), "openshift-ai", "tiny", None)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/tiny-w4a16"


@pytest.mark.parametrize("name, expected", [
    ("tiny", "tiny"), ("llama.3.1-8b", "llama-3-1-8b"), ("8b-model", "m-8b-model"),
])
def test_isvc_name_is_a_dns_label(name: str, expected: str) -> None:
    cr = body(name=name, serve={})
    assert serving.isvc_name(cr, parse(cr)) == expected
    long = body(name="a" * 80, serve={})
    made = serving.isvc_name(long, parse(long))
    assert len(made) == 63 and made != serving.isvc_name(body(name="a" * 81, serve={}), parse(body(name="a" * 81, serve={})))
    named = body(serve={"name": "my-endpoint"})
    assert serving.isvc_name(named, parse(named)) == "my-endpoint"


def test_runtime_from_the_template_keeps_the_platform_image_and_names_the_template() -> None:
    cr = body(serve={})
    runtime = serving.serving_runtime(TEMPLATE, "tiny", cr, owned=False)
    assert runtime["kind"] == "ServingRuntime" and runtime["metadata"]["name"] == "tiny"
    assert runtime["spec"]["containers"][0]["image"] == RUNTIME_IMAGE
    assert runtime["spec"]["containers"][0]["args"][-1] == "--served-model-name={{.Name}}"  # KServe's own placeholder stays
    assert runtime["metadata"]["annotations"] == {
        "openshift.io/display-name": "vLLM NVIDIA GPU ServingRuntime for KServe",
        "opendatahub.io/template-name": "vllm-cuda-runtime-template",
        "opendatahub.io/template-display-name": "vLLM NVIDIA GPU ServingRuntime for KServe",
        "opendatahub.io/apiProtocol": "REST", "modelpress.dev/compressionjob-uid": UID}
    assert runtime["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    assert TEMPLATE["objects"][0]["spec"]["containers"][0]["image"] == "${VLLM_IMAGE}"  # the template is not changed
    with pytest.raises(serving.TemplateUnusable, match="holds no ServingRuntime"):
        serving.serving_runtime({**TEMPLATE, "objects": []}, "tiny", cr, owned=False)


@pytest.mark.parametrize("status, expected", [
    ({}, (False, None, "Unknown", "Deploying")),
    ({"url": "https://tiny.apps.example", "conditions": [{"type": "Ready", "status": "True"}]},
     (True, "https://tiny.apps.example", "True", "Ready")),
    ({"address": {"url": "http://tiny-predictor.ml.svc.cluster.local"}, "conditions": [{"type": "Ready", "status": "True"}]},
     (True, "http://tiny-predictor.ml.svc.cluster.local", "True", "Ready")),
    ({"conditions": [{"type": "Ready", "status": "False", "message": "pods starting"}]}, (False, None, "Unknown", "Deploying")),
    ({"modelStatus": {"transitionStatus": "BlockedByFailedLoad", "states": {"activeModelState": "FailedToLoad"},
                      "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "CUDA out of memory"}}},
     (False, None, "False", "ModelLoadFailed")),
    ({"modelStatus": {"transitionStatus": "InvalidSpec"}}, (False, None, "False", "InvalidSpec")),
    ({"modelStatus": {"lastFailureInfo": {"reason": "no such reason!", "message": "x"}}}, (False, None, "False", "ServingFailed")),
])
def test_serving_state_reads_kserve_status(status: dict[str, Any], expected: tuple[Any, ...]) -> None:
    state = serving.serving_state({"status": status}, "tiny")
    assert (state.ready, state.url, state.status, state.reason) == expected
    if state.reason == "ModelLoadFailed":
        assert state.message == "CUDA out of memory"


def test_a_deleted_isvc_is_reported() -> None:
    state = serving.serving_state(None, "tiny")
    assert (state.ready, state.status, state.reason) == (False, "False", "InferenceServiceDeleted")


# --- the running operator ----------------------------------------------------------------------------------


def isvc(kube: Any, name: str = "tiny") -> dict[str, Any] | None:
    return obj(kube, ISVCS, name)


@pytest.mark.asyncio
async def test_openshift_ai_publishes_serves_and_mirrors_readiness(kube, validator) -> None:
    await preload(kube)
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", spec(publishConnection={"displayName": "Tiny Llama int4"}, serve=SERVE))
        await succeed(kube)

        # The connection: the output connection's keys, the output's own bucket, the dashboard's metadata.
        await eventually(lambda: status_of(kube).get("output"))
        assert status_of(kube)["output"] == {"uri": "s3://models/compressed/tiny-llama-w4a16", "connection": "tiny",
                                             "path": "compressed/tiny-llama-w4a16"}
        secret = obj(kube, SECRETS, "tiny")
        assert decoded(secret) == {**S3_KEYS, "AWS_S3_BUCKET": "models"}
        assert secret["metadata"]["labels"] == {"opendatahub.io/dashboard": "true", "opendatahub.io/managed": "true", **OWNED}
        assert {k: v for k, v in secret["metadata"]["annotations"].items() if k in CONNECTION_TYPES} == CONNECTION_TYPES
        assert "ownerReferences" not in secret["metadata"]
        assert condition(kube, "Published")["status"] == "True"

        # The runtime from the platform's template, and the InferenceService using it through the connection.
        served = await eventually(lambda: isvc(kube))
        runtime = obj(kube, RUNTIMES, "tiny")
        assert runtime["spec"]["containers"][0]["image"] == RUNTIME_IMAGE
        assert served["spec"]["predictor"]["model"]["runtime"] == "tiny"
        assert served["metadata"]["annotations"]["opendatahub.io/connections"] == "tiny"
        assert served["metadata"]["annotations"]["opendatahub.io/connection-path"] == "compressed/tiny-llama-w4a16"
        assert "storageUri" not in served["spec"]["predictor"]["model"]
        await eventually(lambda: condition(kube, "Serving").get("reason") == "Deploying")
        assert status_of(kube)["serving"] == {"name": "tiny", "runtime": "tiny", "ready": False}

        # KServe reports ready: the URL and readiness are mirrored.
        url = "https://tiny-ml.apps.example.com"
        await set_isvc_status(kube, "tiny", {"url": url, "conditions": [{"type": "Ready", "status": "True"}]})
        await eventually(lambda: status_of(kube)["serving"].get("ready") is True)
        assert status_of(kube)["serving"]["url"] == url and condition(kube, "Serving")["status"] == "True"

        # The model then fails to load: Serving says why, the job stays Succeeded.
        await set_isvc_status(kube, "tiny", {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed"}],
                                             "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                                             "lastFailureInfo": {"reason": "ModelLoadFailed",
                                                                                 "message": "torch.OutOfMemoryError: CUDA out of memory"}}})
        await eventually(lambda: condition(kube, "Serving").get("status") == "False")
        serving_condition = condition(kube, "Serving")
        assert serving_condition["reason"] == "ModelLoadFailed" and "CUDA out of memory" in serving_condition["message"]
        status = status_of(kube)
        assert status["phase"] == "Succeeded" and condition(kube, "Succeeded")["status"] == "True"
        assert status["serving"]["ready"] is False and "failure" not in status
        assert problems(validator, obj(kube, CR, "tiny")) == []
    written = json.dumps([obj(kube, CR, "tiny"), isvc(kube), obj(kube, RUNTIMES, "tiny")])
    assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in written and S3_KEYS["AWS_ACCESS_KEY_ID"] not in written


@pytest.mark.asyncio
async def test_plain_kserve_serves_by_storage_uri_without_a_template(kube) -> None:
    await preload(kube, template=False)
    config = dataclasses.replace(DELIVERY, serving_platform="kserve")
    async with operator_running(config):
        await create_cr(kube, "tiny", spec(serve={"serviceAccountName": "s3-reader", "resources": {"gpus": 1}}))
        await succeed(kube)
        served = await eventually(lambda: isvc(kube))
        model = served["spec"]["predictor"]["model"]
        assert model["storageUri"] == "s3://models/compressed/tiny-llama-w4a16" and model["modelFormat"] == {"name": "vLLM"}
        assert "runtime" not in model and served["spec"]["predictor"]["serviceAccountName"] == "s3-reader"
        assert "opendatahub.io/connections" not in served["metadata"]["annotations"]
        await eventually(lambda: condition(kube, "Serving").get("reason") == "Deploying")
    assert obj(kube, RUNTIMES, "tiny") is None
    assert not [r for r in kube._requests if "/templates/" in r.url.path]


@pytest.mark.asyncio
async def test_deleting_the_job_leaves_the_connection_and_the_served_model(kube) -> None:
    await preload(kube)
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", spec(publishConnection={}, serve={}))
        await succeed(kube)
        await eventually(lambda: status_of(kube).get("serving", {}).get("name"))
        await api(kube, "DELETE", cr_path("tiny"))
        await eventually(lambda: obj(kube, CR, "tiny") is None)
    assert obj(kube, SECRETS, "tiny") and isvc(kube) and obj(kube, RUNTIMES, "tiny")
    # Only the job's own runner Job and scratch claim go with it.
    assert not [r for r in kube._requests if r.method == "DELETE" and "/jobs/" not in r.url.path
                and "/persistentvolumeclaims/" not in r.url.path and r.url.path != cr_path("tiny")]


@pytest.mark.asyncio
async def test_delete_with_job_takes_them_along(kube) -> None:
    await preload(kube)
    async with operator_running(DELIVERY):
        cr = await create_cr(kube, "tiny", spec(publishConnection={"deleteWithJob": True}, serve={"deleteWithJob": True}))
        await succeed(kube)
        await eventually(lambda: status_of(kube).get("serving", {}).get("name"))
        for made in (obj(kube, SECRETS, "tiny"), isvc(kube), obj(kube, RUNTIMES, "tiny")):
            assert made["metadata"]["ownerReferences"][0]["uid"] == cr["metadata"]["uid"]
        await api(kube, "DELETE", cr_path("tiny"))
        await eventually(lambda: obj(kube, CR, "tiny") is None)
    assert obj(kube, SECRETS, "tiny") is None and isvc(kube) is None and obj(kube, RUNTIMES, "tiny") is None
    assert obj(kube, SECRETS, "models-s3"), "the user's own connection stays"


FOREIGN_ISVC = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": "tiny", "namespace": NAMESPACE}, "spec": {"predictor": {}}}


@pytest.mark.asyncio
@pytest.mark.parametrize("case, reason", [
    ("isvc-taken", "NameTaken"), ("no-template", "RuntimeTemplateNotFound"),
    ("connection-taken", "NoConnection"), ("bucket-elsewhere", "NoConnection"),
])
async def test_a_serve_that_cannot_happen_leaves_the_job_succeeded(kube, validator, case: str, reason: str) -> None:
    await preload(kube, template=case != "no-template")
    extra: dict[str, Any] = {"serve": {}} if case == "bucket-elsewhere" else {"publishConnection": {}, "serve": {}}
    if case == "isvc-taken":
        await api(kube, "POST", f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices", FOREIGN_ISVC)
    if case == "connection-taken":
        await create_secret(kube, "tiny", {"NOTE": "the user's own Secret"})
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", spec(**extra))
        await succeed(kube)
        await eventually(lambda: condition(kube, "Serving").get("status") == "False")
        assert condition(kube, "Serving")["reason"] == reason
        assert status_of(kube)["phase"] == "Succeeded" and condition(kube, "Succeeded")["status"] == "True"
        assert problems(validator, obj(kube, CR, "tiny")) == []
    if case == "connection-taken":
        assert condition(kube, "Published")["reason"] == "NameTaken"
        assert decoded(obj(kube, SECRETS, "tiny")) == {"NOTE": "the user's own Secret"}
    if case == "isvc-taken":
        assert isvc(kube)["spec"] == {"predictor": {}}, "someone else's InferenceService is left as it was"


@pytest.mark.asyncio
async def test_a_connection_published_before_by_modelpress_is_updated(kube) -> None:
    await preload(kube)
    earlier = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shared", "namespace": NAMESPACE,
               "labels": {"app.kubernetes.io/managed-by": "modelpress-operator"}}, "data": {"AWS_S3_BUCKET": serving._b64("old")}}
    await api(kube, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", earlier)
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", spec(publishConnection={"name": "shared"}))
        await succeed(kube)
        await eventually(lambda: condition(kube, "Published").get("status") == "True")
    assert decoded(obj(kube, SECRETS, "shared"))["AWS_S3_BUCKET"] == "models"
    assert "(updated)" in condition(kube, "Published")["message"]


def test_the_example_publishes_registers_and_serves(validator) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "compress-register-serve.yaml"
    cr = with_defaults(yaml.safe_load(example.read_text()))
    assert problems(validator, cr) == []
    cr["metadata"].update(namespace=NAMESPACE, uid=UID)
    job = parse(cr)
    source = {key: serving._b64(value) for key, value in S3_KEYS.items()}
    secret = serving.published_connection(cr, job, source, "W4A16 GPTQ")
    assert secret["metadata"]["name"] == serving.connection_name(cr, job) == "qwen2-5-7b-w4a16"
    assert decoded(secret)["AWS_S3_BUCKET"] == "models"
    isvc = serving.inference_service(cr, job, "openshift-ai", serving.isvc_name(cr, job), serving.connection_name(cr, job))
    assert isvc["metadata"]["annotations"]["opendatahub.io/connections"] == "qwen2-5-7b-w4a16"
    assert isvc["metadata"]["annotations"]["opendatahub.io/connection-path"] == "Qwen2.5-7B-Instruct-quantized.w4a16"
    assert isvc["spec"]["predictor"]["model"]["args"] == ["--max-model-len=8192"]
    reg = registration(cr, job, {}, "W4A16 GPTQ", "qwen2-5-7b-w4a16", S3_KEYS["AWS_S3_ENDPOINT"], None)
    assert (reg.model_name, reg.version, reg.artifact["storage_key"]) == ("Qwen2.5-7B-Instruct-quantized.w4a16", "1", "qwen2-5-7b-w4a16")


def test_the_platform_is_an_operator_setting() -> None:
    assert OperatorConfig.from_env({}).serving_platform == "openshift-ai"
    assert OperatorConfig.from_env({"MODELPRESS_SERVING_PLATFORM": "kserve", "MODELPRESS_SERVING_RUNTIME": "vllm"}).serving_runtime == "vllm"
    with pytest.raises(ValueError, match="MODELPRESS_SERVING_PLATFORM"):
        OperatorConfig.from_env({"MODELPRESS_SERVING_PLATFORM": "knative"})
