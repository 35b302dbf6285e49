"""S3 downloads against moto: verified, resumed only from the same object, confined to the download folder."""

from pathlib import Path
from typing import Any

import pytest

from modelpress.contract import Uri
from modelpress.engine.errors import ModelPressError
from modelpress.paths import PathEscape
from modelpress.runner.publish import s3_output
from modelpress.runner.storage import (MANIFEST, build_manifest, download_object, download_prefix, folder_identity, list_objects,
                                       listing_identity, local_path)
from support.s3 import s3, s3_endpoint  # noqa: F401 (fixture)


def put(client: Any, bucket: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def test_verified_download_skips_what_is_whole_and_refuses_a_mismatch(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b"{}")
    (src / "model.safetensors").write_bytes(b"x" * 1000)
    s3_output(client, "s3://store/models/m").publish(src, build_manifest(src, {"name": "j"}, {}), "ns/j/1", overwrite=False)

    dest = tmp_path / "down"
    got = download_prefix(client, "store", "models/m", dest)
    assert got.files == 2 and (dest / "model.safetensors").read_bytes() == b"x" * 1000 and not (dest / MANIFEST).exists()
    assert download_prefix(client, "store", "models/m", dest).skipped_files == 2

    client.put_object(Bucket="store", Key="models/m/model.safetensors", Body=b"y" * 1000)  # same size, other bytes
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download_prefix(client, "store", "models/m", dest)  # the manifest's sha256 no longer matches
    assert not (dest / "model.safetensors.part").exists()
    with pytest.raises(ModelPressError, match="spec.model.uri: s3://store/models/none holds no objects"):
        download_prefix(client, "store", "models/none", dest)


def test_a_part_of_another_object_is_discarded_not_resumed(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="parts")
    put(client, "parts", {"m/model.safetensors": b"new" * 1000})
    meta = list_objects(client, "parts", "m")["model.safetensors"]
    target = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(b"old" * 500)  # half of some other object, from an earlier run
    (tmp_path / "model.safetensors.etag").write_text("0123456789abcdef0123456789abcdef")
    fetched, resumed = download_object(client, "parts", "m/model.safetensors", meta["Size"], target, meta["ETag"], None, lambda n: None)
    assert (fetched, resumed) == (3000, 0) and target.read_bytes() == b"new" * 1000

    # a finished file whose object was replaced since (same size) is fetched again, not kept
    put(client, "parts", {"m/model.safetensors": b"neu" * 1000})
    meta = list_objects(client, "parts", "m")["model.safetensors"]
    download_object(client, "parts", "m/model.safetensors", meta["Size"], target, meta["ETag"], None, lambda n: None)
    assert target.read_bytes() == b"neu" * 1000


def test_an_object_replaced_mid_download_is_refused_not_spliced(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="swap")
    put(client, "swap", {"m/w.safetensors": b"a" * 4000})
    meta = list_objects(client, "swap", "m")["w.safetensors"]
    target = tmp_path / "w.safetensors"
    (tmp_path / "w.safetensors.part").write_bytes(b"a" * 1000)  # the first try got this far
    (tmp_path / "w.safetensors.etag").write_text(meta["ETag"])
    put(client, "swap", {"m/w.safetensors": b"b" * 4000})  # replaced before the retry
    with pytest.raises(RuntimeError, match="changed during the download; the retry fetches the new object"):
        download_object(client, "swap", "m/w.safetensors", meta["Size"], target, meta["ETag"], None, lambda n: None)
    assert not target.exists() and not (tmp_path / "w.safetensors.part").exists()


def test_object_keys_that_climb_out_are_refused_and_write_nothing(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="evil")
    put(client, "evil", {"m/config.json": b"{}", "m/../../../escaped.txt": b"pwned"})
    dest = tmp_path / "scratch" / "source"
    with pytest.raises(ModelPressError, match="spec.model.uri: an object key under s3://evil/m leaves the download folder"):
        download_prefix(client, "evil", "m", dest)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    assert not (dest / "config.json").exists()  # refused before any download


def test_a_replaced_source_has_another_identity(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="ident")
    put(client, "ident", {"m/a": b"1", "m/b": b"2"})
    first = listing_identity(list_objects(client, "ident", "m"))
    assert listing_identity(list_objects(client, "ident", "m")) == first
    put(client, "ident", {"m/b": b"3"})
    assert listing_identity(list_objects(client, "ident", "m")) != first

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "w").write_bytes(b"1")
    before = folder_identity(folder)
    (folder / "w").write_bytes(b"22")
    assert folder_identity(folder) != before


def test_pvc_paths_stay_inside_their_claim(tmp_path: Path) -> None:
    env = {"MODELPRESS_PVC_ROOT": str(tmp_path / "pvcs")}
    claim = tmp_path / "pvcs" / "models"
    (claim / "inside").mkdir(parents=True)
    (claim / "out").symlink_to(tmp_path)  # a link in the claim that leads out of it
    assert local_path(Uri("pvc", "models", "inside", "pvc://models/inside"), env) == claim / "inside"
    for path in ("../other", "out/x", "/etc"):
        with pytest.raises(PathEscape):
            local_path(Uri("pvc", "models", path, f"pvc://models/{path}"), env)
