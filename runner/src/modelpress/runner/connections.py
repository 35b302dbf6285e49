"""Credentials and referenced objects: S3 connections, the hub token, and recipe ConfigMaps.

In a pod they arrive as env vars and files (`modelpress.contract` has the convention). On a
laptop the same names resolve from env vars, or from Secret and ConfigMap documents given next to
the job (in the job file itself or in `--secrets FILE`), so one manifest runs in both places.
Secret values never leave this module except inside a client; `secret_values` lists them so
every line the runner prints can be scrubbed of them. An S3 answer that no retry can change
(wrong keys, a bucket that does not exist) is turned into a ModelPressError naming the spec
field, by `refusing_permanently`, wherever the client is called.
"""

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modelpress.engine.errors import ModelPressError
from modelpress.contract import (ROLE, S3_IDENTITY_KEYS, S3_KEYS, ConnectionUse, Env, JobSpec, KeyRef, S3Key, connection_uses,
                                 parse_uri, shown)


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
        kind, meta = doc["kind"], doc.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise ModelPressError(f"{kind}: a document has no metadata.name; name it as the job refers to it")
        if kind == "Secret":
            values = {str(k): _decoded(name, str(k), v) for k, v in _section(doc, "data").items()}
            values.update({str(k): str(v) for k, v in _section(doc, "stringData").items()})
            secrets[name] = values
        else:
            config_maps[name] = {str(k): str(v) for k, v in _section(doc, "data").items()}
    return LocalObjects(secrets, config_maps)


def _section(doc: dict[str, Any], key: str) -> Mapping[Any, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, Mapping):
        raise ModelPressError(f"{doc['kind']} {doc['metadata']['name']!r}: {key} must be a mapping of keys to values")
    return value


def _decoded(secret: str, key: str, value: Any) -> str:
    """A Secret's `data` value: base64 of UTF-8 text, as Kubernetes keeps it; the value itself is never shown."""
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError, TypeError):
        raise ModelPressError(
            f"Secret {secret!r}: data.{shown(key)} is not base64 of text; encode the value (base64 -w0) or put it under stringData"
        ) from None


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


# S3 error codes no retry can fix, with what each one means for the job; "connection" problems are the
# Secret's, "uri" problems the location's. A HEAD request's error has no body, only its status.
PERMANENT_S3_ERRORS: dict[str, tuple[str, str]] = {
    "InvalidAccessKeyId": ("connection", "the endpoint does not know the access key; check AWS_ACCESS_KEY_ID in the Secret"),
    "SignatureDoesNotMatch": ("connection",
                              "the secret key does not belong to the access key; check AWS_SECRET_ACCESS_KEY in the Secret"),
    "InvalidToken": ("connection", "the session token is not valid; renew the Secret's keys"),
    "ExpiredToken": ("connection", "the session token has expired; renew the Secret's keys"),
    "AuthorizationHeaderMalformed": ("connection", "the endpoint expects another region; check AWS_DEFAULT_REGION in the Secret"),
    "403": ("connection", "the endpoint refused the keys (HTTP 403); check the Secret's keys and their access to the bucket"),
    "AccessDenied": ("uri", "the connection's keys may not {operation} there; grant them access or choose another location"),
    "AllAccessDisabled": ("uri", "all access to this bucket is disabled; choose another location"),
    "NoSuchBucket": ("uri", "bucket {bucket} does not exist at {endpoint}; create it, or fix the bucket in the URI"),
    "InvalidBucketName": ("uri", "{bucket} is not a valid bucket name; fix the URI"),
    "PermanentRedirect": ("uri", "the bucket is served by another endpoint; check AWS_S3_ENDPOINT and AWS_DEFAULT_REGION"),
}


def s3_refusal(use: ConnectionUse, code: str, operation: str, bucket: str | None, endpoint: str) -> str | None:
    """The one-line problem an S3 error code means for the job (naming its spec field), or None when a retry may help."""
    if code not in PERMANENT_S3_ERRORS:
        return None
    kind, fix = PERMANENT_S3_ERRORS[code]
    located = [f for f, uri in use.uris if parse_uri(uri).scheme == "s3" and parse_uri(uri).root == bucket]
    where = located[0] if kind == "uri" and located else use.role.connection_field
    message = fix.format(operation=operation, bucket=shown(bucket), endpoint=endpoint)
    return f"{where}: S3 refused {operation} ({code}): {message}"


def refusing_permanently(client: Any, spec: JobSpec, role: str) -> Any:
    """`client`, made to raise ModelPressError (exit 2, no retry) on an S3 error that `s3_refusal` knows.

    Every call of the client passes here, in whatever thread or library made it; errors a retry
    may fix, and those the caller means to handle (a missing key), stay botocore's.
    """
    use = next(u for u in connection_uses(spec) if u.role.name == role)
    endpoint = client.meta.endpoint_url

    def remember_bucket(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["modelpress_bucket"] = params.get("Bucket")

    def refuse(http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        if http_response.status_code < 300:
            return
        error = parsed.get("Error", {})
        bucket = error.get("BucketName") or context.get("modelpress_bucket")
        problem = s3_refusal(use, str(error.get("Code", "")), model.name, bucket, endpoint)
        if problem is not None:
            raise ModelPressError(problem)

    client.meta.events.register("before-parameter-build.s3", remember_bucket)
    client.meta.events.register("after-call.s3", refuse)
    return client
