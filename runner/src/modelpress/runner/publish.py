"""Publishing a compressed model: staged beside the output, verified, then moved into place, manifest last.

The rules, the same for S3 prefixes and for local or PVC folders:
- The output holds nothing, or a ModelPress model (its `modelpress-manifest.json`) and only the files
  that manifest lists. Anything else is someone's data: the job refuses the output before any compute.
- A model there is replaced only with `overwrite: true`, and only the files its manifest lists are.
- The new model is uploaded to a staging location first (a hidden sibling prefix on S3, a hidden
  folder inside a local output) and each file is verified there. Until that is complete the previous
  model stays whole; a retry of the same job resumes the staged upload.
- The swap then moves the staged files into place and writes the manifest last. It is recorded before
  it starts, so a run killed in the middle of it is finished by the retry.
- One job publishes to an output at a time: the staging's owner file names the job and is refreshed as
  it uploads; another job waits until that owner has been silent for `STALE_AFTER_S`.
"""

import errno
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from modelpress.contract import parse_uri
from modelpress.engine.errors import ModelPressError
from modelpress.paths import PathEscape, climbs, confined
from modelpress.runner.storage import CHUNK, MANIFEST, WORKERS, BytesFn, Transfer, list_objects, locked, sha256_file

STAGING = ".modelpress-staging"
OWNER = "owner"  # in the staging: the job publishing, rewritten after each file as a heartbeat
SWAP = "swap.json"  # in the staging: the manifest being moved into place and the files it replaces
PROBE = "probe"
STALE_AFTER_S = 900.0
PART_BYTES = 64 << 20  # S3 multipart chunk size, which also fixes the ETag the upload must get


class Store(Protocol):
    """The few operations publishing needs, on keys relative to the store's root ('a/b', no '..')."""

    def files(self, prefix: str) -> dict[str, int]: ...  # every file under prefix, relative to it -> size
    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def upload(self, key: str, local: Path, sha256: str, on_bytes: BytesFn) -> None: ...
    def holds(self, key: str, local: Path, size: int, sha256: str) -> bool: ...  # the key holds exactly that file
    def move(self, src: str, dst: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def age_s(self, key: str) -> float | None: ...  # seconds since the key was written, None when absent


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def listed_path(rel: str) -> str:
    """A path from a manifest, which may have been written by anyone: relative, without '.' or '..'."""
    if not rel or climbs(rel):
        raise PathEscape(f"a manifest lists {rel!r}, which is not a path inside the model")
    return rel


@dataclass
class Swap:
    """The record of a swap: the manifest going into place, and the files of the model it replaces."""

    manifest: dict[str, Any]
    replaced: list[str]

    def to_json(self) -> bytes:
        return json.dumps({"manifest": self.manifest, "replaced": self.replaced}).encode()

    @staticmethod
    def from_json(data: bytes) -> "Swap":
        body = json.loads(data)
        return Swap(body["manifest"], [listed_path(r) for r in body["replaced"]])


class Output:
    """A model's place (`target`) in a store, with its staging beside it."""

    def __init__(self, store: Store, target: str, staging: str, uri: str) -> None:
        self.store, self.target, self.staging, self.uri = store, target, staging, uri

    # --- before any compute ----------------------------------------------------------------------

    def check(self, job_id: str, overwrite: bool) -> None:
        """Refuse now what `publish` would refuse later: no write access, someone's files, a model without overwrite."""
        self._probe()
        swap, owner = self._swap(), self._owner()
        if swap is not None and owner == job_id:
            return  # this job's own swap, killed half-way: the retry finishes it
        self._refuse_busy(job_id, owner)
        self._refuse_foreign(swap, overwrite)

    def _probe(self) -> None:
        key = join(self.staging, f"{PROBE}-{uuid.uuid4().hex[:8]}")
        try:
            self.store.write(key, b"")
            self.store.delete(key)
        except OSError as err:
            if not isinstance(err, PermissionError) and err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ModelPressError(f"spec.output.uri: cannot write to {self.uri} ({err.strerror or err}); give the job write "
                                  "access there or choose another URI") from None

    def _refuse_busy(self, job_id: str, owner: str | None) -> None:
        age = self.store.age_s(join(self.staging, OWNER))
        if owner is not None and owner != job_id and age is not None and age < STALE_AFTER_S:
            raise ModelPressError(f"spec.output.uri: job {owner} is publishing to {self.uri} now; wait until it is done "
                                  "or choose another URI")

    def _refuse_foreign(self, swap: Swap | None, overwrite: bool) -> None:
        present = self._target_files()
        manifest = self._read_json(join(self.target, MANIFEST))
        ours: set[str] = {MANIFEST}
        if manifest is not None:
            ours |= {listed_path(f["path"]) for f in manifest.get("files", [])}
        if swap is not None:  # another job's swap, abandoned: both its models' files are ModelPress's
            ours |= set(swap.replaced) | {listed_path(f["path"]) for f in swap.manifest["files"]}
        foreign = sorted(set(present) - ours)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ModelPressError(f"spec.output.uri: {self.uri} holds files that are not part of a ModelPress model ({shown}); "
                                  "choose another URI or move them away")
        if (manifest is not None or swap is not None) and not overwrite:
            raise ModelPressError(f"spec.output.uri: {self.uri} already holds a model; set output.overwrite: true or choose another URI")

    # --- after the gate ----------------------------------------------------------------------------

    def publish(self, src: Path, manifest: dict[str, Any], job_id: str, overwrite: bool,
                on_bytes: BytesFn | None = None) -> Transfer:
        """Stage, verify, swap. A retry resumes whichever of the three was cut off."""
        start = time.monotonic()
        swap, owner = self._swap(), self._owner()
        sent = [0] * len(manifest["files"])
        if swap is None or owner != job_id:
            self._refuse_busy(job_id, owner)
            self._refuse_foreign(swap, overwrite)
            self.store.write(join(self.staging, OWNER), job_id.encode())
            sent = self._stage(src, manifest, job_id, locked(on_bytes))
            previous = self._read_json(join(self.target, MANIFEST))
            replaced = [listed_path(f["path"]) for f in previous["files"]] if previous else []
            if swap is not None:  # an abandoned swap's files are replaced too
                replaced += [*swap.replaced, *(f["path"] for f in swap.manifest["files"])]
            swap = Swap(manifest, sorted(set(replaced)))
            self.store.write(join(self.staging, SWAP), swap.to_json())
        self._swap_in(swap)
        return Transfer(len(sent), sum(sent), sum(1 for s in sent if s == 0), 0, time.monotonic() - start)

    def _stage(self, src: Path, manifest: dict[str, Any], job_id: str, on_bytes: BytesFn) -> list[int]:
        """Upload every file into the staging (skipping those already there and whole), then verify each."""
        from concurrent.futures import ThreadPoolExecutor

        def one(entry: dict[str, Any]) -> int:
            key, local = join(self.staging, entry["path"]), src / entry["path"]
            if self.store.holds(key, local, entry["size"], entry["sha256"]):
                return 0
            self.store.upload(key, local, entry["sha256"], on_bytes)
            if not self.store.holds(key, local, entry["size"], entry["sha256"]):
                raise RuntimeError(f"{self.uri}: {entry['path']} arrived damaged in the staging; the retry uploads it again")
            self.store.write(join(self.staging, OWNER), job_id.encode())
            return entry["size"]

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, manifest["files"]))

    def _swap_in(self, swap: Swap) -> None:
        """Staged files into place, the files only the old model had removed, the manifest last; then no staging."""
        new = [listed_path(f["path"]) for f in swap.manifest["files"]]
        self.store.delete(join(self.target, MANIFEST))
        staged, placed = self.store.files(self.staging), self._target_files()
        for rel in new:
            if rel in staged:
                self.store.move(join(self.staging, rel), join(self.target, rel))
            elif rel not in placed:
                raise RuntimeError(f"{self.uri}: {rel} is neither staged nor in place; the retry uploads the model again")
        for rel in sorted(set(swap.replaced) - set(new)):
            self.store.delete(join(self.target, rel))
        self.store.write(join(self.target, MANIFEST), json.dumps(swap.manifest, indent=1).encode())
        for rel in self.store.files(self.staging):
            if rel not in (SWAP, OWNER):
                self.store.delete(join(self.staging, rel))
        self.store.delete(join(self.staging, SWAP))
        self.store.delete(join(self.staging, OWNER))

    # --- reading -------------------------------------------------------------------------------------

    def _target_files(self) -> dict[str, int]:
        return {rel: size for rel, size in self.store.files(self.target).items() if not rel.startswith(f"{STAGING}/")}

    def _read_json(self, key: str) -> dict[str, Any] | None:
        data = self.store.read(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise ModelPressError(f"spec.output.uri: {self.uri} has an unreadable {PurePosixPath(key).name}; "
                                  "remove it or choose another URI") from None

    def _swap(self) -> Swap | None:
        data = self.store.read(join(self.staging, SWAP))
        return Swap.from_json(data) if data is not None else None

    def _owner(self) -> str | None:
        data = self.store.read(join(self.staging, OWNER))
        return data.decode(errors="replace") if data is not None else None


# --- folders -------------------------------------------------------------------------------------


class FolderStore:
    """A local or PVC folder; every key resolves inside it, links included."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made_root = not root.exists()  # a folder the job creates, it removes again while empty

    def _path(self, key: str) -> Path:
        return confined(self.root, key, follow_last=False)

    def files(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        found = {}
        for folder, dirs, names in os.walk(base):  # a linked folder is an entry of its own, never walked into
            for name in names + [d for d in dirs if (Path(folder) / d).is_symlink()]:
                path = Path(folder) / name
                found[path.relative_to(base).as_posix()] = path.lstat().st_size
        return found

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # threads write the owner file at once
        tmp.write_bytes(data)
        tmp.replace(path)

    def upload(self, key: str, local: Path, sha256: str, on_bytes: BytesFn) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a link there is replaced, never written through
        with local.open("rb") as f, path.open("xb") as out:
            while block := f.read(8 * CHUNK):
                out.write(block)
                on_bytes(len(block))
            out.flush()
            os.fsync(out.fileno())

    def holds(self, key: str, local: Path, size: int, sha256: str) -> bool:
        path = self._path(key)
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size and sha256_file(path) == sha256

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = self._path(src)
        source.replace(target)
        self._prune(source.parent)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file() or path.is_symlink():
            path.unlink()
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove the folders a move or delete left empty, up to the root."""
        while folder.is_relative_to(self.root) and folder.is_dir() and not any(folder.iterdir()):
            if folder == self.root and not self.made_root:
                return
            folder.rmdir()
            folder = folder.parent

    def age_s(self, key: str) -> float | None:
        path = self._path(key)
        return time.time() - path.lstat().st_mtime if path.is_file() else None


def folder_output(path: Path, uri: str) -> Output:
    """A folder output: the staging is a hidden folder inside it, on the same filesystem, so moves are renames."""
    if path.exists() and not path.is_dir():
        raise ModelPressError(f"spec.output.uri: {uri} is a file; give a directory")
    return Output(FolderStore(path), "", STAGING, uri)


# --- S3 ------------------------------------------------------------------------------------------


def multipart_etag(path: Path, part_bytes: int) -> str:
    """The ETag S3 gives an object uploaded from `path` in parts of `part_bytes` (MD5 of the parts' MD5s)."""
    size = path.stat().st_size
    digests = []
    with path.open("rb") as f:
        while block := f.read(part_bytes):
            digests.append(hashlib.md5(block, usedforsecurity=False).digest())
    if size < part_bytes:
        return digests[0].hex() if digests else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class S3Store:
    """A bucket; keys are object keys. Access errors become PermissionError so the probe can name them."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client, self.bucket = client, bucket

    def _call(self, name: str, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return getattr(self.client, name)(Bucket=self.bucket, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                return None
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                raise PermissionError(f"S3 {code}") from None
            raise

    def files(self, prefix: str) -> dict[str, int]:
        return {rel: meta["Size"] for rel, meta in list_objects(self.client, self.bucket, prefix).items()}

    def read(self, key: str) -> bytes | None:
        response = self._call("get_object", Key=key)
        return response["Body"].read() if response is not None else None

    def write(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=key, Body=data)

    def upload(self, key: str, local: Path, sha256: str, on_bytes: BytesFn) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=WORKERS)
        self.client.upload_file(str(local), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}}, Config=config,
                                Callback=on_bytes)

    def holds(self, key: str, local: Path, size: int, sha256: str) -> bool:
        """Size and ETag as S3 computed them on receipt, so a damaged upload is caught, not only a missing one."""
        head = self._call("head_object", Key=key)
        if head is None or head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            return False
        return head["ETag"].strip('"') == multipart_etag(local, PART_BYTES)

    def move(self, src: str, dst: str) -> None:
        self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst)
        self._call("delete_object", Key=src)

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=key)

    def age_s(self, key: str) -> float | None:
        from email.utils import parsedate_to_datetime

        head = self._call("head_object", Key=key)
        if head is None:
            return None
        now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])  # the store's clock, not the pod's
        return (now - head["LastModified"]).total_seconds()


def s3_output(client: Any, uri: str) -> Output:
    """An S3 output: the staging is the hidden sibling prefix `.NAME.modelpress-staging`, outside the model's prefix."""
    location = parse_uri(uri)
    if not location.path:
        raise ModelPressError(f"spec.output.uri: {uri} needs a prefix inside the bucket (s3://bucket/name)")
    parent, _, name = location.path.rpartition("/")
    return Output(S3Store(client, location.root), location.path, join(parent, f".{name}{STAGING}"), uri)
