"""S3 outputs and downloads against moto: manifest last, resumed and skipped uploads, checksums, overwrite."""

from pathlib import Path

import pytest

from modelpress.engine.errors import ModelPressError
from modelpress.runner.storage import MANIFEST, UPLOAD_MARKER, S3Output, build_manifest, download_prefix, list_objects
from support.s3 import s3, s3_endpoint  # noqa: F401 (fixture)


def model_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_publish_resume_overwrite_and_verified_download(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3(s3_endpoint)
    client.create_bucket(Bucket="store")
    src = model_dir(tmp_path / "v1", {"config.json": b"{}", "model.safetensors": b"w" * 300_000, "sub/tokenizer.json": b"t"})
    manifest = build_manifest(src, {"name": "job"}, {"modelpress": "0.1.0"})
    assert [f["path"] for f in manifest["files"]] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    out = S3Output(client, "s3://store/models/m")
    out.check("ns/job/1", overwrite=False)
    first = out.publish(src, manifest, "ns/job/1")
    assert first.bytes == 300_003 and set(list_objects(client, "store", "models/m")) == {f["path"] for f in manifest["files"]} | {MANIFEST}

    again = out.publish(src, manifest, "ns/job/1")  # a retried upload sends nothing already there
    assert again.bytes == 0 and again.skipped_files == 3
    with pytest.raises(ModelPressError, match="already holds a model; set output.overwrite: true"):
        out.check("ns/job/1", overwrite=False)

    # a crashed upload (marker present, no manifest) is resumed by the same job and refused to others
    client.delete_object(Bucket="store", Key=f"models/m/{MANIFEST}")
    client.put_object(Bucket="store", Key=f"models/m/{UPLOAD_MARKER}", Body=b"ns/job/1")
    out.check("ns/job/1", overwrite=False)
    with pytest.raises(ModelPressError, match=r"is not empty \(4 objects\)"):
        out.check("ns/other/2", overwrite=False)

    v2 = model_dir(tmp_path / "v2", {"config.json": b'{"v": 2}', "model.safetensors": b"x" * 1000})
    out.check("ns/other/2", overwrite=True)
    out.publish(v2, build_manifest(v2, {"name": "other"}, {}), "ns/other/2")
    assert set(list_objects(client, "store", "models/m")) == {"config.json", "model.safetensors", MANIFEST}

    dest = tmp_path / "down"
    got = download_prefix(client, "store", "models/m", dest)
    assert got.files == 2 and (dest / "model.safetensors").read_bytes() == b"x" * 1000 and not (dest / MANIFEST).exists()
    assert download_prefix(client, "store", "models/m", dest).skipped_files == 2

    client.put_object(Bucket="store", Key="models/m/model.safetensors", Body=b"y" * 1000)  # same size, other bytes
    (dest / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download_prefix(client, "store", "models/m", dest)
    assert not (dest / "model.safetensors").exists() and not (dest / "model.safetensors.part").exists()
    with pytest.raises(ModelPressError, match="no objects there"):
        download_prefix(client, "store", "models/none", dest)
