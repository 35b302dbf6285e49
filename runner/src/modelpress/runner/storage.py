"""Where models come from and go to: the hub, S3, PVCs and local directories.

Downloads run in parallel, resume from `.part` files after an interruption (ranged GETs), and are
checked against the size and, when known, the checksum of each object. Outputs are published
with `modelpress-manifest.json` written last, so a reader that finds the manifest finds a whole
model; an existing model is never replaced unless the job says `overwrite: true`.
"""

import hashlib
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from modelpress.contract import Env, PodPath, S3Key, Uri, parse_uri, pvc_mount
from modelpress.runner.connections import S3Connection
from modelpress.engine.errors import ModelPressError
from modelpress.engine.weights import HUB_FILES

log = logging.getLogger(__name__)

MANIFEST = "modelpress-manifest.json"
UPLOAD_MARKER = ".modelpress-upload"  # names the job whose upload is in progress, so a retry may resume it
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
    """Where a pvc:// or local URI is on this machine: a claim is where the pod mounts it."""
    if uri.scheme == "pvc":
        return Path(pvc_mount(uri.root, env.get(Env.PVC_ROOT, PodPath.PVC_ROOT))) / uri.path
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
    client: Any, bucket: str, key: str, size: int, target: Path, etag: str | None, sha256: str | None, on_bytes: BytesFn
) -> tuple[int, int]:
    """Fetch one object to `target`, continuing a `.part` left by an earlier try; (bytes fetched, bytes resumed).

    Checked against the size, then the manifest's sha256 or, for single-part uploads, the ETag's MD5.
    """
    if target.is_file() and target.stat().st_size == size and (sha256 is None or sha256_file(target) == sha256):
        return 0, 0
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={have}-")
        with part.open("ab") as out:
            _copy_stream(response["Body"], out, on_bytes)
    else:
        part.touch()  # an empty object, or a part already whole
    got = part.stat().st_size
    if got != size:
        raise RuntimeError(f"s3://{bucket}/{key}: got {got} bytes, expected {size}; the retry resumes it")
    if sha256 is not None:
        ok = sha256_file(part) == sha256
    elif etag and "-" not in etag:
        ok = _md5_file(part) == etag
    else:
        ok = True  # a multipart object without a manifest: its size is all S3 vouches for
    if not ok:
        part.unlink()
        raise RuntimeError(f"s3://{bucket}/{key}: checksum mismatch; the partial file was removed, the retry fetches it again")
    part.replace(target)
    return got - have, have


def download_prefix(client: Any, bucket: str, prefix: str, dest: Path, on_bytes: BytesFn | None = None) -> Transfer:
    """Mirror s3://bucket/prefix into `dest`, in parallel; files already there and whole are kept."""
    start = time.monotonic()
    objects = list_objects(client, bucket, prefix)
    if not objects:
        raise ModelPressError(f"s3://{bucket}/{prefix}: no objects there; check the URI and connection")
    checksums: dict[str, str] = {}
    if MANIFEST in objects:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
        checksums = {f["path"]: f["sha256"] for f in manifest.get("files", [])}
    wanted = {k: v for k, v in objects.items() if k != MANIFEST and not k.endswith("/") and k != UPLOAD_MARKER}
    counter = _locked(on_bytes)

    def one(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
        rel, meta = item
        key = f"{prefix}/{rel}" if prefix else rel
        return download_object(client, bucket, key, meta["Size"], dest / rel, meta["ETag"], checksums.get(rel), counter)

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


# --- the manifest --------------------------------------------------------------------------------


def build_manifest(src: Path, job: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    """Every file of the model with its size and sha256, plus who made it and with what."""
    paths = sorted(p for p in src.rglob("*") if p.is_file() and p.name not in (MANIFEST, UPLOAD_MARKER))
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


# --- outputs -------------------------------------------------------------------------------------


class S3Output:
    """A model under s3://bucket/prefix, published file by file (multipart, parallel), manifest last."""

    def __init__(self, client: Any, uri: str) -> None:
        self.client = client
        self.uri = uri
        location = parse_uri(uri)
        self.bucket, self.prefix = location.root, location.path
        if not self.prefix:
            raise ModelPressError(f"spec.output.uri: {uri} needs a prefix inside the bucket (s3://bucket/name)")

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def check(self, job_id: str, overwrite: bool) -> None:
        """Refuse a prefix that holds a model, or objects other than this job's own unfinished upload."""
        existing = list_objects(self.client, self.bucket, self.prefix)
        if not existing or overwrite:
            return
        if MANIFEST in existing:
            raise ModelPressError(f"spec.output.uri: {self.uri} already holds a model; set output.overwrite: true or choose another URI")
        if UPLOAD_MARKER in existing:
            owner = self.client.get_object(Bucket=self.bucket, Key=self._key(UPLOAD_MARKER))["Body"].read().decode()
            if owner == job_id:
                return
        raise ModelPressError(
            f"spec.output.uri: {self.uri} is not empty ({len(existing)} objects); set output.overwrite: true or choose another URI"
        )

    def publish(self, src: Path, manifest: dict[str, Any], job_id: str, on_bytes: BytesFn | None = None) -> Transfer:
        from boto3.s3.transfer import TransferConfig

        start = time.monotonic()
        existing = list_objects(self.client, self.bucket, self.prefix)
        if MANIFEST in existing:  # overwriting: readers stop seeing a whole model first
            self.client.delete_object(Bucket=self.bucket, Key=self._key(MANIFEST))
        self.client.put_object(Bucket=self.bucket, Key=self._key(UPLOAD_MARKER), Body=job_id.encode())
        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=WORKERS)
        counter = _locked(on_bytes)

        def one(entry: dict[str, Any]) -> int:
            key = self._key(entry["path"])
            if entry["path"] in existing and existing[entry["path"]]["Size"] == entry["size"]:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                if head.get("Metadata", {}).get("sha256") == entry["sha256"]:
                    return 0
            self.client.upload_file(
                str(src / entry["path"]), self.bucket, key,
                ExtraArgs={"Metadata": {"sha256": entry["sha256"]}}, Config=config, Callback=counter,
            )
            return entry["size"]

        with ThreadPoolExecutor(4) as pool:
            sent = list(pool.map(one, manifest["files"]))
        stale = set(existing) - {f["path"] for f in manifest["files"]} - {MANIFEST, UPLOAD_MARKER}
        for rel in sorted(stale):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        body = json.dumps(manifest, indent=1).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(MANIFEST), Body=body, ContentType="application/json")
        self.client.delete_object(Bucket=self.bucket, Key=self._key(UPLOAD_MARKER))
        return Transfer(len(sent), sum(sent), sum(1 for s in sent if s == 0), 0, time.monotonic() - start)


class DirOutput:
    """A model in a local or PVC directory, copied file by file, manifest last."""

    def __init__(self, path: Path, uri: str) -> None:
        self.path = path
        self.uri = uri

    def check(self, job_id: str, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ModelPressError(f"spec.output.uri: {self.uri} is a file; give a directory")
        entries = list(self.path.iterdir()) if self.path.is_dir() else []
        if not entries or overwrite:
            return
        if (self.path / MANIFEST).is_file():
            raise ModelPressError(f"spec.output.uri: {self.uri} already holds a model; set output.overwrite: true or choose another path")
        marker = self.path / UPLOAD_MARKER
        if marker.is_file() and marker.read_text() == job_id:
            return
        raise ModelPressError(f"spec.output.uri: {self.uri} is not empty; set output.overwrite: true or choose another path")

    def publish(self, src: Path, manifest: dict[str, Any], job_id: str, on_bytes: BytesFn | None = None) -> Transfer:
        start = time.monotonic()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)
        (self.path / UPLOAD_MARKER).write_text(job_id)
        keep = {f["path"] for f in manifest["files"]} | {MANIFEST, UPLOAD_MARKER}
        for old in sorted(self.path.rglob("*"), reverse=True):
            rel = old.relative_to(self.path).as_posix()
            if old.is_file() and rel not in keep:
                old.unlink()
            elif old.is_dir() and not any(old.iterdir()):
                old.rmdir()
        for entry in manifest["files"]:
            target = self.path / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry["path"], target)
            if on_bytes:
                on_bytes(entry["size"])
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (self.path / UPLOAD_MARKER).unlink()
        total = sum(f["size"] for f in manifest["files"])
        return Transfer(len(manifest["files"]), total, 0, 0, time.monotonic() - start)


def _locked(on_bytes: BytesFn | None) -> BytesFn:
    """boto3 calls back from many threads."""
    lock = threading.Lock()

    def count(n: int) -> None:
        if on_bytes is not None:
            with lock:
                on_bytes(n)

    return count
