"""Publishing as an unlucky user and an attacker meet it: other files in the output, killed uploads and swaps, two jobs."""

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from botocore.exceptions import ClientError

from modelpress.engine.errors import ModelPressError
from modelpress.paths import PathEscape
from modelpress.runner import publish as publishing
from modelpress.runner.publish import OWNER, STAGING, Output, folder_output, multipart_etag, s3_output
from modelpress.runner.storage import MANIFEST, build_manifest, list_objects
from support.s3 import s3, s3_endpoint  # noqa: F401 (fixture)

JOB, OTHER = "ns/job/1", "ns/other/2"


def model(root: Path, files: dict[str, bytes]) -> tuple[Path, dict[str, Any]]:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root, build_manifest(root, {"name": root.name}, {})


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its digest."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def v1(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    return model(tmp_path / "v1", {"config.json": b'{"v": 1}', "model.safetensors": b"a" * 5000, "only-in-v1.json": b"{}"})


@pytest.fixture
def v2(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    return model(tmp_path / "v2", {"config.json": b'{"v": 2}', "model.safetensors": b"b" * 7000, "sub/tokenizer.json": b"t"})


def fail_on(target: Any, name: str, after: int) -> None:
    """Make `target.name` raise on its call number `after + 1`, as a killed pod would stop there."""
    original: Callable[..., Any] = getattr(target, name)
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError(f"killed during {name}")
        return original(*args, **kwargs)

    setattr(target, name, wrapped)


def test_overwrite_keeps_files_that_are_not_the_models(tmp_path: Path, v1: Any, v2: Any) -> None:
    out = tmp_path / "out"
    folder_output(out, "out").publish(*v1, JOB, overwrite=False)
    (out / "notes.txt").write_text("mine")
    (out / "keep" / "data.bin").parent.mkdir()
    (out / "keep" / "data.bin").write_bytes(b"x")
    (out / "linked").symlink_to(tmp_path)
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(ModelPressError, match=r"not part of a ModelPress model \(keep/data.bin, linked, notes.txt\)"):
            folder_output(out, "out").check(OTHER, overwrite=overwrite)
    with pytest.raises(ModelPressError, match="not part of a ModelPress model"):
        folder_output(out, "out").publish(*v2, OTHER, overwrite=True)
    assert snapshot(out) == before


def test_a_source_folder_is_never_an_output_to_overwrite(tmp_path: Path, v1: Any) -> None:
    src, _ = v1  # a model folder without a ModelPress manifest: someone's model
    before = snapshot(src)
    with pytest.raises(ModelPressError, match="not part of a ModelPress model"):
        folder_output(src, "v1").check(JOB, overwrite=True)
    assert snapshot(src) == before


def test_overwrite_replaces_exactly_the_previous_models_files(tmp_path: Path, v1: Any, v2: Any) -> None:
    out = tmp_path / "out"
    folder_output(out, "out").publish(*v1, JOB, overwrite=False)
    with pytest.raises(ModelPressError, match="already holds a model; set output.overwrite: true"):
        folder_output(out, "out").check(OTHER, overwrite=False)
    folder_output(out, "out").check(OTHER, overwrite=True)
    folder_output(out, "out").publish(*v2, OTHER, overwrite=True)
    assert snapshot(out) == {**snapshot(v2[0]), MANIFEST: snapshot(out)[MANIFEST]}
    assert json.loads((out / MANIFEST).read_text())["files"] == v2[1]["files"]
    assert not (out / STAGING).exists()


def test_an_interrupted_overwrite_leaves_the_previous_model_whole(tmp_path: Path, v1: Any, v2: Any) -> None:
    out = tmp_path / "out"
    folder_output(out, "out").publish(*v1, JOB, overwrite=False)
    before = snapshot(out)
    broken = folder_output(out, "out")
    fail_on(broken.store, "upload", after=1)
    with pytest.raises(RuntimeError, match="killed during upload"):
        broken.publish(*v2, OTHER, overwrite=True)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(STAGING)} == before  # old model, manifest and all

    retry = folder_output(out, "out")
    retry.check(OTHER, overwrite=True)
    done = retry.publish(*v2, OTHER, overwrite=True)
    assert done.skipped_files >= 1  # what the killed run staged is not sent again
    assert json.loads((out / MANIFEST).read_text())["files"] == v2[1]["files"] and not (out / "only-in-v1.json").exists()


def test_a_swap_killed_half_way_is_finished_by_the_retry(tmp_path: Path, v1: Any, v2: Any) -> None:
    out = tmp_path / "out"
    folder_output(out, "out").publish(*v1, JOB, overwrite=False)
    broken = folder_output(out, "out")
    fail_on(broken.store, "move", after=1)
    with pytest.raises(RuntimeError, match="killed during move"):
        broken.publish(*v2, OTHER, overwrite=True)
    assert not (out / MANIFEST).exists()  # no reader takes the half-swapped folder for a model
    folder_output(out, "out").check(OTHER, overwrite=False)  # its own swap: the retry may finish it
    with pytest.raises(ModelPressError, match=f"job {OTHER} is publishing to out now"):
        folder_output(out, "out").check("ns/third/3", overwrite=True)
    folder_output(out, "out").publish(*v2, OTHER, overwrite=False)
    assert snapshot(out) == {**snapshot(v2[0]), MANIFEST: snapshot(out)[MANIFEST]}


def test_a_second_job_waits_while_the_first_publishes(tmp_path: Path, v1: Any, v2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    first = folder_output(out, "out")
    fail_on(first.store, "upload", after=1)
    with pytest.raises(RuntimeError):
        first.publish(*v1, JOB, overwrite=False)
    with pytest.raises(ModelPressError, match=f"job {JOB} is publishing to out now"):
        folder_output(out, "out").check(OTHER, overwrite=False)
    monkeypatch.setattr(publishing, "STALE_AFTER_S", -1.0)  # the first job's owner file has gone quiet
    folder_output(out, "out").publish(*v2, OTHER, overwrite=False)
    assert json.loads((out / MANIFEST).read_text())["job"] == {"name": "v2"}
    assert not (out / "only-in-v1.json").exists() and not (out / STAGING).exists()


def test_a_forged_manifest_cannot_delete_outside_the_output(tmp_path: Path, v2: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / MANIFEST).write_text(json.dumps({"files": [{"path": "../victim.txt", "size": 8, "sha256": "0"}]}))
    with pytest.raises(PathEscape, match="not a path inside the model"):
        folder_output(out, "out").publish(*v2, JOB, overwrite=True)
    assert victim.read_text() == "precious"


def test_a_symlinked_output_file_is_replaced_not_followed(tmp_path: Path, v1: Any, v2: Any) -> None:
    out = tmp_path / "out"
    folder_output(out, "out").publish(*v1, JOB, overwrite=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(victim)
    folder_output(out, "out").publish(*v2, OTHER, overwrite=True)
    assert victim.read_text() == "precious" and not (out / "config.json").is_symlink()


# --- S3 ------------------------------------------------------------------------------------------


class ReadOnly:
    """A client whose credentials may read but not write, as a read-only bucket policy answers."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        if name in ("put_object", "upload_file", "copy", "delete_object"):
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, name)
            return refuse
        return getattr(self.client, name)


def test_s3_publish_stages_beside_the_prefix_and_resumes(s3_endpoint: str, v1: Any, v2: Any) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="pub")
    out = s3_output(client, "s3://pub/models/m")
    out.check(JOB, overwrite=False)
    first = out.publish(*v1, JOB, overwrite=False)
    assert first.bytes == 5010 and set(list_objects(client, "pub", "models/m")) == {*(f["path"] for f in v1[1]["files"]), MANIFEST}
    assert list_objects(client, "pub", "models/.m.modelpress-staging") == {}

    client.put_object(Bucket="pub", Key="models/m/README-by-hand.md", Body=b"mine")
    with pytest.raises(ModelPressError, match=r"not part of a ModelPress model \(README-by-hand.md\)"):
        s3_output(client, "s3://pub/models/m").check(OTHER, overwrite=True)
    client.delete_object(Bucket="pub", Key="models/m/README-by-hand.md")

    broken = s3_output(client, "s3://pub/models/m")
    fail_on(broken.store, "move", after=1)
    with pytest.raises(RuntimeError, match="killed during move"):
        broken.publish(*v2, OTHER, overwrite=True)
    retry = s3_output(client, "s3://pub/models/m")
    again = retry.publish(*v2, OTHER, overwrite=True)
    assert again.bytes == 0  # everything was staged and verified before the swap
    assert set(list_objects(client, "pub", "models/m")) == {*(f["path"] for f in v2[1]["files"]), MANIFEST}
    body = json.loads(client.get_object(Bucket="pub", Key=f"models/m/{MANIFEST}")["Body"].read())
    assert body["files"] == v2[1]["files"]
    assert list_objects(client, "pub", "models/.m.modelpress-staging") == {}


def test_s3_read_only_credentials_fail_before_any_compute(s3_endpoint: str) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="ro-bucket")
    with pytest.raises(ModelPressError, match="spec.output.uri: cannot write to s3://ro-bucket/m .*AccessDenied.*write access"):
        s3_output(ReadOnly(client), "s3://ro-bucket/m").check(JOB, overwrite=False)


def test_s3_damaged_upload_is_caught_by_the_etag(s3_endpoint: str, v1: Any) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="dmg")
    out = s3_output(client, "s3://dmg/m")
    src, manifest = v1

    def corrupt(key: str, local: Path, sha256: str, on_bytes: Any) -> None:  # the bytes that reach the store differ
        client.put_object(Bucket="dmg", Key=key, Body=b"z" * local.stat().st_size, Metadata={"sha256": sha256})

    out.store.upload = corrupt  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="arrived damaged in the staging"):
        out.publish(src, manifest, JOB, overwrite=False)
    assert MANIFEST not in list_objects(client, "dmg", "m")


def test_multipart_etag_matches_what_s3_computes(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="etag")
    monkeypatch.setattr(publishing, "PART_BYTES", 5 << 20)  # S3's smallest part keeps the file small
    big = tmp_path / "big.bin"
    big.write_bytes(b"q" * ((5 << 20) * 2 + 123))
    store = s3_output(client, "s3://etag/m").store
    store.upload("m/big.bin", big, "sha", lambda n: None)
    etag = client.head_object(Bucket="etag", Key="m/big.bin")["ETag"].strip('"')
    assert etag == multipart_etag(big, 5 << 20) and etag.endswith("-3")
    assert store.holds("m/big.bin", big, big.stat().st_size, "sha")
    big.write_bytes(b"r" * ((5 << 20) * 2 + 123))  # same size, other bytes: not what the store holds
    assert not store.holds("m/big.bin", big, big.stat().st_size, "sha")


def test_the_output_owner_file_names_the_job(tmp_path: Path, v1: Any) -> None:
    out = tmp_path / "out"
    broken: Output = folder_output(out, "out")
    fail_on(broken.store, "upload", after=0)
    with pytest.raises(RuntimeError):
        broken.publish(*v1, JOB, overwrite=False)
    assert (out / STAGING / OWNER).read_text() == JOB
