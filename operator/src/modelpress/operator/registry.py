"""A succeeded job's output as a new version in the Model Registry, through the official async client.

`registration` builds everything registered from the CompressionJob and its result (pure);
`register_version` makes the calls: the registered model (found by name, else created), a new
version, and its model artifact. The artifact carries what the dashboard's "deploy from registry"
reads (an `s3://bucket/path?endpoint=…&defaultRegion=…` URI that it parses back into a connection,
the connection as storage key, the path, format vLLM) and the lineage back to the CompressionJob
(kind `compressionjob`, the namespace, the name, the uid). A version already made for this very
job (its uid is a property of the version) is taken over, so a restart registers nothing twice.

Only `model_registry.core.ModelRegistryAPIClient` is used: it runs on kopf's event loop as it is,
where the package's synchronous `ModelRegistry` would patch every event loop of the process.
"""

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from modelpress.contract import CompressionJob, parse_uri
from modelpress.operator.serving import MODEL_FORMAT, describe_job, model_name

SOURCE_KIND = "compressionjob"
AUTHOR = "modelpress-operator"
UID_PROPERTY = "compressionjob_uid"
# status.result's metric names -> the registry's property names.
RESULT_METRICS = {
    "perplexityOriginal": "perplexity_original",
    "perplexityCompressed": "perplexity_compressed",
    "perplexityIncreasePercent": "perplexity_increase_percent",
}
RESULT_SIZES = {
    "originalSizeBytes": "original_size_bytes",
    "compressedSizeBytes": "compressed_size_bytes",
    "ratio": "compression_ratio",
}

Property = bool | int | float | str


@dataclass(frozen=True)
class Registration:
    """What is registered for one job, before any call is made."""

    model_name: str
    version: str
    description: str
    properties: dict[str, Property]
    artifact: dict[str, str]  # ModelArtifact fields, by the client's (snake_case) names
    source_id: str


@dataclass(frozen=True)
class RegistryIds:
    registered_model_id: str
    model_version_id: str
    model_artifact_id: str


class RegistryRetry(Exception):
    """Worth another try later (the registry is down or slow, the token is refused); `reason` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RegistryRefused(Exception):
    """The registry will not take this registration as the spec asks for it; a retry cannot help."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def artifact_uri(job: CompressionJob, endpoint: str | None, region: str | None) -> str:
    """The output as the dashboard parses it back into a connection: endpoint and region in the query."""
    uri = parse_uri(job.spec.output.uri)
    base = f"{uri.scheme}://{uri.root}/{uri.path}"
    if uri.scheme != "s3" or not endpoint:
        return base
    query = f"endpoint={quote(endpoint, safe='')}"
    return f"{base}?{query}&defaultRegion={quote(region, safe='')}" if region else f"{base}?{query}"


def properties(body: Mapping[str, Any], job: CompressionJob, result: Mapping[str, Any], recipe: str) -> dict[str, Property]:
    """The version's custom properties: recipe, scheme, base model, calibration data, sizes, perplexities, the job."""
    spec, meta = job.spec, body["metadata"]
    found: dict[str, Property] = {
        "recipe": recipe,
        "scheme": spec.recipe.preset or "custom",
        "base_model": spec.model.uri,
        "compressionjob": f"{meta['namespace']}/{meta['name']}",
        UID_PROPERTY: meta["uid"],
    }
    if spec.recipe.preset:
        found["algorithm"] = spec.recipe.algorithm
    if spec.model.revision:
        found["base_model_revision"] = spec.model.revision
    if spec.calibration.dataset and spec.recipe.needs_data() is not False:
        found["calibration_dataset"] = spec.calibration.dataset
        found["calibration_samples"] = spec.calibration.num_samples
    for key, name in RESULT_SIZES.items():
        if result.get(key) is not None:
            found[name] = result[key]
    for metric in result.get("metrics") or []:
        if metric.get("name") in RESULT_METRICS:
            found[RESULT_METRICS[metric["name"]]] = float(metric["value"])
    return found


def registration(body: Mapping[str, Any], job: CompressionJob, result: Mapping[str, Any], recipe: str,
                 connection: str | None, endpoint: str | None, region: str | None) -> Registration:
    """Everything registered for `job`; `connection`, `endpoint` and `region` say how an S3 output is reached."""
    register = job.spec.registration
    assert register is not None, "only for jobs with spec.register"
    meta = body["metadata"]
    name = register.model_name or model_name(job)
    uri = parse_uri(job.spec.output.uri)
    artifact = {
        "name": name,
        "uri": artifact_uri(job, endpoint, region),
        "model_format_name": MODEL_FORMAT,
        "model_source_kind": SOURCE_KIND,
        "model_source_group": meta["namespace"],
        "model_source_name": meta["name"],
        "model_source_id": meta["uid"],
        "state": "LIVE",
    }
    if uri.scheme == "s3" and connection:
        artifact.update(storage_key=connection, storage_path=uri.path)
    return Registration(model_name=name, version=register.version or meta["name"],
                        description=describe_job(body, job, recipe), properties=properties(body, job, result, recipe),
                        artifact=artifact, source_id=meta["uid"])


def error_message(err: Any, limit: int = 300) -> str:
    """What an HTTP error answer says, briefly: the `message` of its JSON body (the registry's Error,
    a Kubernetes Status), else the HTTP reason. Both clients' exceptions carry `body` and `reason`."""
    try:
        return str(json.loads(err.body).get("message") or "")[:limit]
    except (TypeError, ValueError, AttributeError):
        return str(getattr(err, "reason", "") or "")[:limit]


async def _register(client: Any, reg: Registration) -> RegistryIds:
    from model_registry.types import ModelArtifact, ModelVersion, RegisteredModel

    model = await client.get_registered_model_by_params(name=reg.model_name)
    if model is None:
        model = await client.upsert_registered_model(RegisteredModel(name=reg.model_name, description=reg.description))
    version = await client.get_model_version_by_params(registered_model_id=model.id, name=reg.version)
    if version is None:
        version = await client.upsert_model_version(
            ModelVersion(name=reg.version, author=AUTHOR, description=reg.description, custom_properties=reg.properties),
            model.id)
    elif (version.custom_properties or {}).get(UID_PROPERTY) != reg.source_id:
        raise RegistryRefused("VersionExists", f"spec.register.version: {reg.model_name} already has a version "
                                               f"{reg.version!r} from something else; name another version")
    artifacts = await client.get_model_artifacts(version.id)
    artifact = next((a for a in artifacts if a.model_source_id == reg.source_id), None)
    if artifact is None:
        artifact = await client.upsert_model_version_artifact(ModelArtifact(**reg.artifact), version.id)
    return RegistryIds(registered_model_id=model.id, model_version_id=version.id, model_artifact_id=artifact.id)


async def register_version(url: str, token: str | None, reg: Registration, timeout: float) -> RegistryIds:
    """Register `reg` at the registry `url`; RegistryRetry or RegistryRefused say why it did not happen."""
    # Imported here: the package's import configures the root logger, which must stay the operator's.
    from model_registry.core import ModelRegistryAPIClient
    from mr_openapi import Configuration
    from mr_openapi.exceptions import ApiException

    client = ModelRegistryAPIClient(Configuration(host=url.rstrip("/"), access_token=token))
    try:
        return await asyncio.wait_for(_register(client, reg), timeout)
    except TimeoutError:  # before OSError, of which it is one
        raise RegistryRetry("RegistryUnreachable", f"the Model Registry at {url} did not answer within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as err:
        raise RegistryRetry("RegistryUnreachable", f"cannot reach the Model Registry at {url}: {type(err).__name__}") from None
    except ApiException as err:
        said = error_message(err)
        detail = f"the Model Registry at {url} answered {err.status}" + (f": {said}" if said else "")
        if err.status in (401, 403):
            raise RegistryRetry("RegistryUnauthorized", f"{detail}; check spec.register.tokenSecret") from None
        if err.status is None or err.status >= 500 or err.status == 429:
            raise RegistryRetry("RegistryUnreachable", detail) from None
        raise RegistryRefused("RegistryRefused", detail) from None
