"""Whole jobs that try to read or write outside the places they name, or reuse work made from another source."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpress.runner.cli import main
from modelpress.runner.storage import MANIFEST
from support.models import CORPUS
from support.s3 import HF_TOKEN, SECRET_KEY, job_document, trained_llama  # noqa: F401 (fixture)


def run(tmp_path: Path, doc: Any) -> tuple[int, dict[str, Any]]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    code = main(["run", str(job), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term), "--format", "json"])
    return code, json.loads(term.read_text())


def test_a_symlinked_secret_in_the_source_never_reaches_the_output(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    source = tmp_path / "model"
    shutil.copytree(llama_dir, source)
    (source / "preprocessor_config.json").symlink_to("/proc/self/environ")
    code, term = run(tmp_path, job_document(str(source), str(tmp_path / "out")))
    err = capsys.readouterr().err
    assert code == 2 and term["reason"] == "InvalidInput"
    assert err.splitlines()[-1] == ("modelpress: error: spec.model.uri: preprocessor_config.json is a symbolic link to "
                                    "/proc/self/environ, outside the model folder; replace it with the file itself")
    assert not (tmp_path / "out").exists()
    assert SECRET_KEY not in err and HF_TOKEN not in err

    # a link that stays inside the model folder is an ordinary file of the model
    (source / "preprocessor_config.json").unlink()
    (source / "generation_config.json").rename(source / "generation.json")
    (source / "generation_config.json").symlink_to("generation.json")
    code, term = run(tmp_path, job_document(str(source), str(tmp_path / "out")))
    assert code == 0
    published = json.loads((tmp_path / "out" / MANIFEST).read_text())["files"]
    assert all(not (tmp_path / "out" / f["path"]).is_symlink() for f in published)
    assert SECRET_KEY.encode() not in b"".join((tmp_path / "out" / f["path"]).read_bytes() for f in published)


@pytest.mark.parametrize("field", ["model", "output"])
def test_pvc_traversal_is_refused_with_exit_2_and_writes_nothing(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, field: str
) -> None:
    root = tmp_path / "pvcs"
    (root / "claim").mkdir(parents=True)
    shutil.copytree(llama_dir, root / "claim" / "model")
    monkeypatch.setenv("MODELPRESS_PVC_ROOT", str(root))
    uris = {"model": "pvc://claim/model", "output": "pvc://claim/out"}
    uris[field] = "pvc://claim/../../escaped"
    before = sorted(p for p in tmp_path.rglob("*"))
    code, term = run(tmp_path, job_document(uris["model"], uris["output"]))
    err = capsys.readouterr().err
    assert code == 2 and term["reason"] == "InvalidSpec" and f"spec.{field}.uri" in err and "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*") if p.name not in ("job.yaml", "termination-log")) == before
    assert not (tmp_path / "escaped").exists()


def test_a_link_inside_a_claim_that_leads_out_is_refused(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "pvcs"
    (root / "claim").mkdir(parents=True)
    shutil.copytree(llama_dir, tmp_path / "elsewhere")
    (root / "claim" / "model").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("MODELPRESS_PVC_ROOT", str(root))
    code, term = run(tmp_path, job_document("pvc://claim/model", "pvc://claim/out"))
    assert code == 2 and "leads out of" in capsys.readouterr().err.splitlines()[-1]


def test_a_source_replaced_before_the_retry_is_compressed_again(
    trained_llama: Path, llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "model"
    shutil.copytree(trained_llama, source)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS[:8]))
    doc = job_document(str(source), str(tmp_path / "out"),
                       evaluation={"perplexity": {"dataset": str(text), "maxTokens": 256}, "maxPerplexityIncrease": 0})
    code, first = run(tmp_path, doc)
    assert code == 3  # compressed, not published: the compressed model waits in scratch for a retry
    doc["spec"]["evaluation"]["maxPerplexityIncrease"] = 1000
    shutil.copyfile(llama_dir / "model.safetensors", source / "model.safetensors")  # replaced before the retry
    code, term = run(tmp_path, doc)
    assert code == 0 and term["resumedCompression"] is False
    assert term["metrics"]["perplexityOriginal"] != pytest.approx(first["metrics"]["perplexityOriginal"])
