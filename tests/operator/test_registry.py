"""Registering the output in the Model Registry, against a local registry that checks every request's shape."""

import asyncio
import copy
import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic.alias_generators import to_camel

from modelpress.contract import Metrics
from modelpress.operator.registry import RESULT_METRICS, RegistryRefused, RegistryRetry, register_version, registration
from modelpress.operator.validation import parse
from support.crd_schema import problems, with_defaults
from support.delivery import DELIVERY, RESULT, SPEC, condition, preload, status_of, succeed
from support.kube import CR, NAMESPACE, create_cr, create_secret, eventually, obj, operator_running
from support.model_registry import FakeRegistry, free_port, registry_serving

UID = "0f0f0f0f-0000-4000-8000-000000000000"
TOKEN = "sha256~registry-token-value"
STATUS_RESULT = {"uri": "s3://models/compressed/tiny-llama-w4a16", "originalSizeBytes": 4000, "compressedSizeBytes": 1000,
                 "ratio": 4.0, "metrics": [{"name": "perplexityOriginal", "value": 18.0},
                                           {"name": "perplexityCompressed", "value": 18.9},
                                           {"name": "perplexityIncreasePercent", "value": 5.0}]}


def job_body(register: dict[str, Any], uid: str = UID) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["register"] = register
    return with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                          "metadata": {"name": "tiny", "namespace": NAMESPACE, "uid": uid}, "spec": spec})


def built(register: dict[str, Any], uid: str = UID) -> Any:
    cr = job_body(register, uid)
    return registration(cr, parse(cr), STATUS_RESULT, "W4A16 GPTQ g64", "tiny", "https://s3.example.internal:9000", "eu-west-1")


def test_registration_carries_the_deploy_fields_the_lineage_and_the_figures() -> None:
    reg = built({"registry": "https://registry.example"})
    assert reg.model_name == "tiny-llama-w4a16" and reg.version == "tiny"
    assert reg.artifact == {
        "name": "tiny-llama-w4a16",
        "uri": "s3://models/compressed/tiny-llama-w4a16?endpoint=https%3A%2F%2Fs3.example.internal%3A9000&defaultRegion=eu-west-1",
        "model_format_name": "vLLM", "storage_key": "tiny", "storage_path": "compressed/tiny-llama-w4a16",
        "model_source_kind": "compressionjob", "model_source_group": NAMESPACE, "model_source_name": "tiny",
        "model_source_id": UID, "state": "LIVE"}
    assert reg.properties == {
        "recipe": "W4A16 GPTQ g64", "scheme": "W4A16", "algorithm": "GPTQ", "base_model": "hf://acme/tiny-llama",
        "base_model_revision": "main", "compressionjob": "ml/tiny", "compressionjob_uid": UID,
        "calibration_dataset": "self-generated", "calibration_samples": 32,
        "original_size_bytes": 4000, "compressed_size_bytes": 1000, "compression_ratio": 4.0,
        "perplexity_original": 18.0, "perplexity_compressed": 18.9, "perplexity_increase_percent": 5.0}
    named = built({"registry": "https://registry.example", "modelName": "Tiny Llama", "version": "1.0.0"})
    assert (named.model_name, named.version, named.artifact["name"]) == ("Tiny Llama", "1.0.0", "Tiny Llama")


def paths(registry: FakeRegistry) -> list[tuple[str, str]]:
    return [(method, path.removeprefix("/api/model_registry/v1/")) for method, path, _, _ in registry.requests]


@pytest.mark.asyncio
async def test_a_new_model_is_created_with_its_first_version() -> None:
    registry = FakeRegistry(token=TOKEN)
    async with registry_serving(registry) as url:
        ids = await register_version(url, TOKEN, built({"registry": url}), timeout=5)
    assert registry.problems == []
    assert paths(registry) == [("GET", "registered_model"), ("POST", "registered_models"), ("GET", "model_version"),
                               ("POST", "model_versions"), ("GET", "model_versions/2/artifacts"),
                               ("POST", "model_versions/2/artifacts")]
    (model,) = registry.models.values()
    (version,) = registry.versions.values()
    (artifact,) = registry.artifacts.values()
    assert model["name"] == "tiny-llama-w4a16" and version["registeredModelId"] == model["id"] == ids.registered_model_id
    assert version["name"] == "tiny" and version["customProperties"]["scheme"] == {"string_value": "W4A16",
                                                                                  "metadataType": "MetadataStringValue"}
    assert version["customProperties"]["perplexity_compressed"]["double_value"] == 18.9
    assert version["customProperties"]["original_size_bytes"] == {"int_value": "4000", "metadataType": "MetadataIntValue"}
    assert artifact["modelFormatName"] == "vLLM" and artifact["storageKey"] == "tiny" and artifact["modelSourceKind"] == "compressionjob"
    assert (ids.model_version_id, ids.model_artifact_id) == (version["id"], artifact["id"])
    assert not hasattr(asyncio, "_nest_patched") and not hasattr(asyncio.get_running_loop(), "_nest_patched"), \
        "the event loop (kopf's, in the operator) is left as it is"


def test_the_registry_reads_the_metric_names_status_result_carries() -> None:
    assert set(RESULT_METRICS) <= {field.alias or to_camel(name) for name, field in Metrics.model_fields.items()}


def test_the_operator_imports_the_registry_client_only_when_it_registers() -> None:
    # The client package configures the root logger when imported; the operator's own logging comes first.
    code = "import sys, modelpress.operator.__main__; assert 'model_registry' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.asyncio
async def test_a_new_version_of_an_existing_model_and_a_repeat_that_adds_nothing() -> None:
    registry = FakeRegistry()
    existing = registry.add_model("tiny-llama-w4a16")
    async with registry_serving(registry) as url:
        ids = await register_version(url, None, built({"registry": url, "version": "2"}), timeout=5)
        again = await register_version(url, None, built({"registry": url, "version": "2"}), timeout=5)
    assert registry.problems == []
    assert ("POST", "registered_models") not in paths(registry)
    assert ids == again and ids.registered_model_id == existing
    (version,) = registry.versions.values()
    assert version["registeredModelId"] == existing and version["name"] == "2"
    assert len(registry.artifacts) == 1


@pytest.mark.asyncio
async def test_a_version_taken_by_something_else_is_refused() -> None:
    registry = FakeRegistry()
    async with registry_serving(registry) as url:
        await register_version(url, None, built({"registry": url}), timeout=5)
        with pytest.raises(RegistryRefused, match="spec.register.version") as err:
            await register_version(url, None, built({"registry": url}, uid="another-uid"), timeout=5)
    assert err.value.reason == "VersionExists" and len(registry.versions) == 1


@pytest.mark.asyncio
async def test_an_unreachable_or_refusing_registry_is_worth_a_retry() -> None:
    port = free_port()
    with pytest.raises(RegistryRetry) as err:
        await register_version(f"http://127.0.0.1:{port}", None, built({"registry": "http://x"}), timeout=5)
    assert err.value.reason == "RegistryUnreachable"
    registry = FakeRegistry(token=TOKEN)
    async with registry_serving(registry) as url:
        with pytest.raises(RegistryRetry) as err:
            await register_version(url, "wrong-token", built({"registry": url}), timeout=5)
    assert err.value.reason == "RegistryUnauthorized" and "wrong-token" not in str(err.value)
    assert registry.models == {}


@pytest.mark.asyncio
async def test_the_operator_retries_an_unreachable_registry_then_registers(kube, validator) -> None:
    await preload(kube)
    await create_secret(kube, "registry-token", {"token": TOKEN})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    register = {"registry": url, "tokenSecret": {"name": "registry-token", "key": "token"}}
    spec = copy.deepcopy(SPEC)
    spec["output"]["publishConnection"] = {}
    spec["register"] = register
    async with operator_running(DELIVERY):
        await create_cr(kube, "tiny", spec)
        await succeed(kube, result=RESULT)
        await eventually(lambda: (status_of(kube).get("registry") or {}).get("attempts", 0) >= 2)
        failed = condition(kube, "Registered")
        assert failed["status"] == "False" and failed["reason"] == "RegistryUnreachable" and url in failed["message"]
        assert status_of(kube)["registry"]["nextAttemptTime"] and status_of(kube)["phase"] == "Succeeded"
        assert problems(validator, obj(kube, CR, "tiny")) == []

        registry = FakeRegistry(token=TOKEN)
        async with registry_serving(registry, port):
            await eventually(lambda: condition(kube, "Registered").get("status") == "True")
    status = status_of(kube)["registry"]
    assert registry.problems == []
    (version,) = registry.versions.values()
    (artifact,) = registry.artifacts.values()
    assert status["modelVersionId"] == version["id"] and status["modelArtifactId"] == artifact["id"]
    assert status["registeredModelId"] == version["registeredModelId"] and "nextAttemptTime" not in status
    assert artifact["storageKey"] == "tiny" and artifact["storagePath"] == "compressed/tiny-llama-w4a16"
    assert artifact["uri"] == ("s3://models/compressed/tiny-llama-w4a16"
                               "?endpoint=https%3A%2F%2Fs3.example.internal%3A9000&defaultRegion=eu-west-1")
    cr = obj(kube, CR, "tiny")
    assert (artifact["modelSourceGroup"], artifact["modelSourceName"], artifact["modelSourceId"]) == (
        NAMESPACE, "tiny", cr["metadata"]["uid"])
    assert version["customProperties"]["perplexity_original"]["double_value"] == 18.0
    assert TOKEN not in json.dumps(cr)
    assert status_of(kube)["phase"] == "Succeeded"
