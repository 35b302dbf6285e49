"""Checks the CRD schema cannot make: URIs that parse, connections that fit them, references that resolve.

Pure functions: the handler looks the referenced objects up (keys only) and passes them in.
Every problem is one line naming the field and the fix.
"""

from collections.abc import Mapping
from typing import Any

from modelpress.operator.job_builder import configmap_refs, secret_refs
from modelpress.contract import (API_VERSION, KIND, SELF_GENERATED, CompressionJob, InvalidSpec, connection_uses,
                                 parse_job, parse_uri)

class SpecRejected(ValueError):
    """The CompressionJob can never run as written; the message names the field."""


def parse(body: Mapping[str, Any]) -> CompressionJob:
    """The CompressionJob as the runner will read it; SpecRejected listing every problem otherwise."""
    document = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(body["metadata"]), "spec": body.get("spec")}
    try:
        job = parse_job(document)
    except InvalidSpec as err:
        raise SpecRejected("; ".join(err.problems)) from None
    problems = uri_problems(job)
    if problems:
        raise SpecRejected("; ".join(problems))
    return job


def _uri_problem(field: str, text: str, connection: str | None, connection_field: str) -> list[str]:
    """What the URI itself cannot say (the spec's parse already checked bucket, repository and claim names)."""
    uri = parse_uri(text)
    if uri.scheme == "s3" and connection is None:
        return [f"{connection_field}: {uri} needs an S3 connection Secret; name one"]
    return []


def uri_problems(job: CompressionJob) -> list[str]:
    """URIs that do not parse, S3 URIs without a connection, and outputs that would die with the pod."""
    found = [problem for use in connection_uses(job.spec) for field, uri in use.uris if uri != SELF_GENERATED
             for problem in _uri_problem(field, uri, use.secret, use.role.connection_field)]
    output = parse_uri(job.spec.output.uri)
    if output.scheme == "local":
        found.append("spec.output.uri: a local path is lost with the pod; use s3://bucket/prefix or pvc://claim/path")
    elif output.scheme == "s3" and not output.path:
        found.append("spec.output.uri: give a prefix inside the bucket, as in s3://bucket/model-name")
    return found


def _field_of(job: CompressionJob, secret: str) -> str:
    """The spec field naming a Secret: a connection, else the hub token."""
    for use in connection_uses(job.spec):
        if use.secret == secret:
            return use.role.connection_field
    return "spec.model.tokenSecret"


def missing_objects(job: CompressionJob, secrets: Mapping[str, set[str] | None],
                    configmaps: Mapping[str, set[str] | None]) -> list[str]:
    """Referenced Secrets/ConfigMaps that do not exist yet (worth waiting for)."""
    found = [f"{_field_of(job, name)}: Secret {name!r} not found in the namespace; create it"
             for name in secret_refs(job) if secrets.get(name) is None]
    found += [f"spec.recipe.configMap: ConfigMap {name!r} not found in the namespace; create it"
              for name in configmap_refs(job) if configmaps.get(name) is None]
    return found


def missing_keys(job: CompressionJob, secrets: Mapping[str, set[str] | None],
                 configmaps: Mapping[str, set[str] | None]) -> list[str]:
    """Keys absent from objects that do exist (the reference itself is wrong)."""
    found = []
    for name, keys in secret_refs(job).items():
        present = secrets.get(name)
        for key in keys if present is not None else []:
            if key not in present:
                found.append(f"{_field_of(job, name)}: Secret {name!r} has no key {key!r}; add it to the Secret")
    for name, keys in configmap_refs(job).items():
        present = configmaps.get(name)
        for key in keys if present is not None else []:
            if key not in present:
                found.append(f"spec.recipe.configMap.key: ConfigMap {name!r} has no key {key!r}; fix the key or the ConfigMap")
    return found
