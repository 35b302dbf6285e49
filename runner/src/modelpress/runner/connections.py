"""Credentials and referenced objects: S3 connections, the hub token, and recipe ConfigMaps.

In a pod they arrive as env vars and files (`modelpress.contract` has the convention). On a
laptop the same names resolve from env vars, or from Secret and ConfigMap documents given next to
the job (in the job file itself or in `--secrets FILE`), so one manifest runs in both places.
Secret values never leave this module except inside a client; `secret_values` lists them so
every line the runner prints can be scrubbed of them.
"""

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modelpress.engine.errors import ModelPressError
from modelpress.contract import ROLE, S3_IDENTITY_KEYS, S3_KEYS, Env, KeyRef, S3Key


@dataclass(frozen=True)
class S3Connection:
    """One OpenShift AI S3 connection; `repr` never shows the keys."""

    access_key_id: str | None = field(repr=False)
    secret_access_key: str | None = field(repr=False)
    endpoint: str | None
    region: str | None
    ca_bundle: str | None = None
    path_style: bool = True
    verify_ssl: bool = True


@dataclass(frozen=True)
class LocalObjects:
    """Secrets and ConfigMaps given as documents next to the job, by name: key -> value."""

    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def local_objects(documents: list[Any]) -> LocalObjects:
    """Collect Secret (data base64, or stringData) and ConfigMap documents; ignore everything else."""
    secrets: dict[str, dict[str, str]] = {}
    config_maps: dict[str, dict[str, str]] = {}
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") not in ("Secret", "ConfigMap"):
            continue
        name = (doc.get("metadata") or {}).get("name")
        if not name:
            raise ModelPressError(f"{doc['kind']}: a document has no metadata.name; name it as the job refers to it")
        if doc["kind"] == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            values.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
            secrets[name] = values
        else:
            config_maps[name] = {k: str(v) for k, v in (doc.get("data") or {}).items()}
    return LocalObjects(secrets, config_maps)


def s3_connection(role: str, name: str | None, env: Mapping[str, str], objects: LocalObjects, field_path: str) -> S3Connection:
    """The connection for `role` (model, data, output): prefixed env, else the named local Secret, else plain env."""
    prefix = ROLE[role].prefix
    if any(prefix + k in env for k in S3_KEYS):
        values = {k: env[prefix + k] for k in S3_KEYS if prefix + k in env}
    elif name is not None and name in objects.secrets:
        values = dict(objects.secrets[name])
    elif any(k in env for k in S3_IDENTITY_KEYS):
        values = {k: env[k] for k in S3_KEYS if k in env}
    else:
        which = f"connection {name!r}" if name else "an S3 connection"
        raise ModelPressError(
            f"{field_path}: no credentials for {which}; set {prefix}AWS_* (or AWS_*) env vars "
            "or pass the Secret with --secrets FILE"
        )
    endpoint = values.get(S3Key.ENDPOINT)
    if endpoint and "://" not in endpoint:
        raise ModelPressError(f"{field_path}: {S3Key.ENDPOINT} must be a URL with its scheme (https://host:port)")
    # The cluster's trusted CA bundle is mounted for every role as the plain variable.
    ca = values.get(S3Key.CA_BUNDLE) or env.get(prefix + S3Key.CA_BUNDLE) or env.get(S3Key.CA_BUNDLE)
    return S3Connection(
        access_key_id=values.get(S3Key.ACCESS_KEY_ID),
        secret_access_key=values.get(S3Key.SECRET_ACCESS_KEY),
        endpoint=endpoint,
        region=values.get(S3Key.REGION),
        ca_bundle=ca,
        path_style=values.get(S3Key.USE_PATH_STYLE, "true").lower() != "false",
        verify_ssl=values.get(S3Key.VERIFY_SSL, "true").lower() != "false",
    )


def hf_token(ref: KeyRef | None, env: Mapping[str, str], objects: LocalObjects) -> str | None:
    """HF_TOKEN from env (the pod maps the Secret key there), else from the local Secret; None is anonymous."""
    if env.get(Env.HF_TOKEN):
        return env[Env.HF_TOKEN]
    if ref is not None and ref.key in objects.secrets.get(ref.name, {}):
        return objects.secrets[ref.name][ref.key]
    return None


def recipe_text(ref: KeyRef, env: Mapping[str, str], objects: LocalObjects) -> str:
    """The recipe YAML of `spec.recipe.configMap`: the mounted file, else the local ConfigMap."""
    path = env.get(Env.RECIPE_FILE)
    if path:
        if not Path(path).is_file():
            raise ModelPressError(f"spec.recipe.configMap: {Env.RECIPE_FILE}={path} does not exist; mount the ConfigMap there")
        return Path(path).read_text(encoding="utf-8")
    data = objects.config_maps.get(ref.name)
    if data is None or ref.key not in data:
        raise ModelPressError(
            f"spec.recipe.configMap: ConfigMap {ref.name!r} with key {ref.key!r} not found; "
            f"set {Env.RECIPE_FILE} or pass the ConfigMap with --secrets FILE"
        )
    return data[ref.key]


def secret_values(connections: list[S3Connection], token: str | None) -> list[str]:
    """Every credential in play, longest first, for scrubbing output."""
    values = [token] + [v for c in connections for v in (c.access_key_id, c.secret_access_key)]
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text

