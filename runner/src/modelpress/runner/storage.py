"""Where models come from and go to: the hub, S3, PVCs and local directories.

Downloads run in parallel and resume from `.part` files after an interruption. A ranged resume asks
S3 for the very object the part began with (If-Match on its ETag), and a part left by another
object is discarded; each file is checked against its size and, when known, its checksum. Every
object key lands inside the download folder or the job stops. Publishing is in publish.py.
"""

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from modelpress.contract import Env, PodPath, S3Key, Uri, parse_uri, pvc_mount
from modelpress.engine.errors import ModelPressError
from modelpress.engine.weights import HUB_FILES
from modelpress.paths import PathEscape, confined
from modelpress.runner.connections import S3Connection

log = logging.getLogger(__name__)

MANIFEST = "modelpress-manifest.json"
CHUNK = 1 << 20
WORKERS = 8

BytesFn = Callable[[int], None]


@dataclass
class Transfer:
    """What one download or upload moved, and what it could skip or resume."""

    files: int = 0
    bytes: int = 0
    skipped_files: int = 0
    resumed_bytes: int = 0
    seconds: float = 0.0


def local_path(uri: Uri, env: Mapping[str, str]) -> Path:
    """Where a pvc:// or local URI is on this machine: a claim is where the pod mounts it, and the path stays inside it."""
    if uri.scheme == "pvc":
        return confined(Path(pvc_mount(uri.root, env.get(Env.PVC_ROOT, PodPath.PVC_ROOT))), uri.path)
    return Path(uri.path).expanduser()


def s3_client(conn: S3Connection) -> Any:
    """A boto3 client for an OpenShift AI connection (boto3 itself does not read the connection's endpoint key)."""
    import boto3
    from botocore.config import Config

    if not conn.verify_ssl:
        log.warning(f"{S3Key.VERIFY_SSL}=false: TLS certificates of the S3 endpoint are not checked")
    config = Config(
        s3={"addressing_style": "path" if conn.path_style else "auto"},
        retries={"max_attempts": 6, "mode": "standard"},
        max_pool_connections=4 * WORKERS,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=conn.endpoint,
        region_name=conn.region or "us-east-1",
        aws_access_key_id=conn.access_key_id,
        aws_secret_access_key=conn.secret_access_key,
        verify=conn.ca_bundle or conn.verify_ssl,
        config=config,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- the hub -------------------------------------------------------------------------------------


def fetch_hub_model(uri: str, revision: str | None, token: str | None) -> Path:
    """hf://org/name: a snapshot in the hub cache (HF_HOME / HF_HUB_CACHE), downloaded in parallel and resumed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = parse_uri(uri).root
    try:
        return Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=HUB_FILES, max_workers=WORKERS))
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelPressError(f"spec.model.uri: {uri} is missing or needs access ({type(err).__name__}); check the name and tokenSecret") from None
    except RevisionNotFoundError:
        raise ModelPressError(f"spec.model.revision: {revision!r} does not exist in {uri}; use a branch, tag or commit") from None
    except LocalEntryNotFoundError:  # no route to the hub (offline, or a network fault): worth a retry
        raise RuntimeError(f"cannot reach the hub for {uri} at revision {revision or 'main'!r}, and the hub cache lacks it") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise ModelPressError(f"spec.model.tokenSecret: the hub refused {uri} (HTTP {status}); check the token") from None
        raise RuntimeError(f"fetching {uri} from the hub failed (HTTP {status})") from None


MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB


def source_config(uri_text: str, revision: str | None, token: str | None, client: Any, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The model's config.json, read alone before anything else is downloaded (for the memory
    preflight); None when it cannot be read here, and the fetch then says why."""
    uri = parse_uri(uri_text)
    try:
        if uri.scheme == "hf":
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(uri.root, "config.json", revision=revision, token=token)).read_bytes()[:MAX_CONFIG_BYTES]
        elif uri.scheme == "s3":
            key = f"{uri.path}/config.json" if uri.path else "config.json"
            text = client.get_object(Bucket=uri.root, Key=key)["Body"].read(MAX_CONFIG_BYTES)
        else:
            with (local_path(uri, env) / "config.json").open("rb") as f:
                text = f.read(MAX_CONFIG_BYTES)
        body = json.loads(text)
    except Exception as err:  # the fetch meets the same problem (a refusal, a missing file) and names it
        log.debug("config.json not read before the fetch: %s", err)
        return None
    return body if isinstance(body, dict) else None


# --- S3 downloads --------------------------------------------------------------------------------


def list_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under `prefix/` (relative key -> Size, ETag)."""
    base = f"{prefix}/" if prefix else ""
    found: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(base) :]] = {"Size": obj["Size"], "ETag": obj["ETag"].strip('"')}
    return found


def _copy_stream(body: Any, out: Any, on_bytes: BytesFn) -> None:
    for chunk in body.iter_chunks(CHUNK):
        out.write(chunk)
        on_bytes(len(chunk))


def download_object(
    client: Any, bucket: str, key: str, size: int, target: Path, etag: str, sha256: str | None, on_bytes: BytesFn
) -> tuple[int, int]:
    """Fetch one object to `target`, continuing a `.part` of the same object left by an earlier try; (fetched, resumed).

    `target.etag` records which object a part or a finished file came from: a file of another object
    (replaced since, or an unrelated key) is never resumed or kept. Every byte is asked for with
    If-Match on that ETag, so an object replaced mid-download is refused, not spliced.
    Checked against the size, then the manifest's sha256 or, for single-part uploads, the ETag's MD5.
    """
    tag = target.with_name(target.name + ".etag")
    recorded = tag.read_text() if tag.is_file() else None
    if recorded == etag and target.is_file() and target.stat().st_size == size and (sha256 is None or sha256_file(target) == sha256):
        return 0, 0
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    if recorded != etag or (part.is_file() and part.stat().st_size > size):
        part.unlink(missing_ok=True)
        tag.write_text(etag)
    have = part.stat().st_size if part.is_file() else 0
    if have < size:
        response = _get(client, bucket, key, etag, part, have)
        with part.open("ab") as out:
            _copy_stream(response["Body"], out, on_bytes)
    else:
        part.touch()  # an empty object, or a part already whole
    got = part.stat().st_size
    if got != size:
        raise RuntimeError(f"s3://{bucket}/{key}: got {got} bytes, expected {size}; the retry resumes it")
    if sha256 is not None:
        ok = sha256_file(part) == sha256
    elif "-" not in etag:
        ok = _md5_file(part) == etag
    else:
        ok = True  # multipart without a manifest: If-Match kept every byte from this object; weights.py checks the headers
    if not ok:
        part.unlink()
        raise RuntimeError(f"s3://{bucket}/{key}: checksum mismatch; the partial file was removed, the retry fetches it again")
    part.replace(target)
    return got - have, have


def _get(client: Any, bucket: str, key: str, etag: str, part: Path, offset: int) -> Any:
    """A ranged GET of exactly the object version `etag` names."""
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-", IfMatch=f'"{etag}"')
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise
        part.unlink(missing_ok=True)
        raise RuntimeError(f"s3://{bucket}/{key} changed during the download; the retry fetches the new object") from None


def download_prefix(client: Any, bucket: str, prefix: str, dest: Path, on_bytes: BytesFn | None = None,
                    field: str = "spec.model.uri") -> Transfer:
    """Mirror s3://bucket/prefix into `dest`, in parallel; files already there and whole are kept."""
    start = time.monotonic()
    objects = list_objects(client, bucket, prefix)
    if not objects:
        raise ModelPressError(f"{field}: s3://{bucket}/{prefix} holds no objects; check the URI and connection")
    checksums: dict[str, str] = {}
    if MANIFEST in objects:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
        checksums = {f["path"]: f["sha256"] for f in manifest.get("files", [])}
    wanted = {k: v for k, v in objects.items() if k != MANIFEST and not k.endswith("/")}
    dest.mkdir(parents=True, exist_ok=True)
    try:
        targets = {rel: confined(dest, rel) for rel in wanted}
    except PathEscape as err:
        raise ModelPressError(f"{field}: an object key under s3://{bucket}/{prefix} leaves the download folder ({err}); "
                              "rename the object") from None
    counter = locked(on_bytes)

    def one(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
        rel, meta = item
        key = f"{prefix}/{rel}" if prefix else rel
        return download_object(client, bucket, key, meta["Size"], targets[rel], meta["ETag"], checksums.get(rel), counter)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(one, sorted(wanted.items())))
    fetched = sum(r[0] for r in results)
    return Transfer(
        files=len(wanted),
        bytes=fetched,
        skipped_files=sum(1 for r in results if r == (0, 0)),
        resumed_bytes=sum(r[1] for r in results),
        seconds=time.monotonic() - start,
    )


def listing_identity(objects: Mapping[str, Mapping[str, Any]]) -> str:
    """What a source is, from its listing: a replaced object changes its ETag and so this."""
    body = json.dumps({rel: [meta["Size"], meta["ETag"]] for rel, meta in sorted(objects.items())})
    return hashlib.sha256(body.encode()).hexdigest()


def folder_identity(model_dir: Path) -> str:
    """What a local or PVC source is: its manifest's digest when it has one, else each file's name, size and mtime."""
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        return sha256_file(manifest)
    stats = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in model_dir.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


# --- the manifest --------------------------------------------------------------------------------


def build_manifest(src: Path, job: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    """Every file of the model with its size and sha256, plus who made it and with what."""
    paths = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(sha256_file, paths))
    files = [{"path": p.relative_to(src).as_posix(), "size": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)]
    return {
        "format": "modelpress-manifest/v1",
        "job": job,
        "versions": versions,
        "totalBytes": sum(f["size"] for f in files),
        "files": files,
    }


def locked(on_bytes: BytesFn | None) -> BytesFn:
    """boto3 calls back from many threads."""
    lock = threading.Lock()

    def count(n: int) -> None:
        if on_bytes is not None:
            with lock:
                on_bytes(n)

    return count
