"""`modelpress run`: whole jobs against moto's S3, local and PVC directories, with every exit code."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pytest
import yaml

from support.models import CORPUS
from modelpress.runner import storage
from modelpress.runner.cli import main
from support.s3 import (
    ACCESS_KEY,
    HF_TOKEN,
    SECRET_KEY,
    connection_env,
    job_document,
    s3,
    s3_endpoint,  # noqa: F401 (fixture)
    trained_llama,  # noqa: F401 (fixture)
    upload_dir,
)


def run(tmp_path: Path, doc: Any, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run a job document; (exit code, termination message)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all(doc) if isinstance(doc, list) else yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    code = main(["run", str(job), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term), "--format", "json", *extra])
    return code, json.loads(term.read_text())


def events_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_s3_model_and_s3_output_match_the_manifest(
    s3_endpoint: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    client = s3(s3_endpoint)
    upload_dir(client, "src", "models/tiny", llama_dir)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:12]))
    client.upload_file(str(calib), "src", "data/calib.jsonl")
    client.create_bucket(Bucket="dst")
    connection_env(monkeypatch, s3_endpoint, "model", "data", "output")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    doc = job_document(
        "s3://src/models/tiny",
        "s3://dst/compressed/tiny-fp8",
        recipe={"preset": "FP8", "algorithm": "RTN"},
        calibration={"dataset": "s3://src/data/calib.jsonl", "numSamples": 8, "maxSequenceLength": 32},
        evaluation={"prompts": ["Paris is"], "maxNewTokens": 4},
    )
    code, term = run(tmp_path, doc)
    out, err = capsys.readouterr()
    assert code == 0, err
    events = events_of(out)
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["fetch", "calibrate", "evaluate", "compress", "evaluate", "publish"]
    compress = [e for e in events if e["event"] == "progress" and e["stage"] == "compress"]
    assert [e["layer"] for e in compress] == [1, 2] and compress[-1]["percent"] == 100.0
    result = events[-1]
    assert result["event"] == "result" and result["calibration"] == {"dataset": "s3://src/data/calib.jsonl", "samples": 8}
    assert result["sizes"]["compressedBytes"] < result["sizes"]["originalBytes"] and term["sizes"] == result["sizes"]
    assert "answers" not in term and result["answers"][0]["prompt"] == "Paris is"

    listed = {o["Key"]: o for o in client.list_objects_v2(Bucket="dst", Prefix="compressed/tiny-fp8/")["Contents"]}
    manifest = json.loads(client.get_object(Bucket="dst", Key="compressed/tiny-fp8/modelpress-manifest.json")["Body"].read())
    assert set(listed) == {f"compressed/tiny-fp8/{f['path']}" for f in manifest["files"]} | {"compressed/tiny-fp8/modelpress-manifest.json"}
    for entry in manifest["files"]:
        body = client.get_object(Bucket="dst", Key=f"compressed/tiny-fp8/{entry['path']}")["Body"].read()
        assert len(body) == entry["size"] and sha256(body) == entry["sha256"], entry["path"]
    newest_file = max(o["LastModified"] for k, o in listed.items() if not k.endswith("manifest.json"))
    assert listed["compressed/tiny-fp8/modelpress-manifest.json"]["LastModified"] >= newest_file
    assert manifest["job"] == {"name": "tiny"} and "transformers" in manifest["versions"]
    config = json.loads(client.get_object(Bucket="dst", Key="compressed/tiny-fp8/config.json")["Body"].read())
    assert config["quantization_config"]["format"] == "float-quantized"
    card = client.get_object(Bucket="dst", Key="compressed/tiny-fp8/README.md")["Body"].read().decode()
    assert "vllm serve" in card and "FP8" in card and "Paris is" in card
    for secret in (ACCESS_KEY, SECRET_KEY, HF_TOKEN):
        assert secret not in out + err + json.dumps(term) + card

    # the same job again: the model there is kept, and the refusal names the field and the fix
    before = {k: o["ETag"] for k, o in listed.items()}
    code, term = run(tmp_path, doc)
    err = capsys.readouterr().err
    assert code == 2 and term["reason"] == "InvalidInput"
    assert err.splitlines()[-1].startswith("modelpress: error: spec.output.uri: s3://dst/compressed/tiny-fp8 already holds a model; set output.overwrite")
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="dst", Prefix="compressed/tiny-fp8/")["Contents"]}
    assert after == before


def test_interrupted_download_resumes(
    s3_endpoint: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    client = s3(s3_endpoint)
    upload_dir(client, "resume", "tiny", llama_dir)
    connection_env(monkeypatch, s3_endpoint, "model")
    monkeypatch.setattr(storage, "CHUNK", 64 << 10)
    real = storage._copy_stream

    def cut_after_two_chunks(body: Any, out: Any, on_bytes: Any) -> None:
        for n, chunk in enumerate(body.iter_chunks(storage.CHUNK)):
            if n == 2:
                raise ConnectionResetError("connection reset by peer")
            out.write(chunk)
            on_bytes(len(chunk))

    monkeypatch.setattr(storage, "_copy_stream", cut_after_two_chunks)
    doc = job_document("s3://resume/tiny", str(tmp_path / "out"))
    code, term = run(tmp_path, doc)
    err = capsys.readouterr().err
    assert code == 1 and term["reason"] == "Error"
    assert err.splitlines()[-1] == "modelpress: error: ConnectionResetError: connection reset by peer"
    parts = list((tmp_path / "scratch").rglob("*.safetensors.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 2 * (64 << 10)
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(storage, "_copy_stream", real)
    code, term = run(tmp_path, doc)
    events = events_of(capsys.readouterr().out)
    assert code == 0
    transfer = next(e for e in events if e["event"] == "transfer")
    shard = (llama_dir / "model.safetensors").stat().st_size
    assert transfer["resumedBytes"] == 2 * (64 << 10) and transfer["skippedFiles"] == transfer["files"] - 1
    assert transfer["bytes"] == shard - 2 * (64 << 10)
    manifest = json.loads((tmp_path / "out" / "modelpress-manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256((tmp_path / "out" / entry["path"]).read_bytes()) == entry["sha256"]


def test_quality_gate_fails_with_exit_3_and_publishes_nothing(
    trained_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS[:8]))
    doc = job_document(
        str(trained_llama),
        str(tmp_path / "out"),
        recipe={"preset": "W4A16", "algorithm": "RTN"},
        evaluation={"perplexity": {"dataset": str(text), "maxTokens": 256}, "maxPerplexityIncrease": 0},
    )
    code, term = run(tmp_path, doc)
    err = capsys.readouterr().err
    assert code == 3 and term["reason"] == "QualityGateFailed" and term["exitCode"] == 3
    metrics = term["metrics"]
    assert metrics["perplexityCompressed"] > metrics["perplexityOriginal"] and metrics["gate"]["passed"] is False
    assert "past the 0.0% allowed by spec.evaluation.maxPerplexityIncrease" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()

    # a looser gate passes, and the compressed model left in scratch is reused, not made again
    doc["spec"]["evaluation"]["maxPerplexityIncrease"] = 1000
    code, term = run(tmp_path, doc)
    assert code == 0 and term["resumedCompression"] is True and term["metrics"]["gate"]["passed"] is True
    assert (tmp_path / "out" / "modelpress-manifest.json").is_file() and not (tmp_path / "scratch").joinpath("local").exists()


def test_text_parquet_and_self_generated_calibration(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(CORPUS))
    doc = job_document(
        str(llama_dir),
        str(tmp_path / "out-text"),
        recipe={"preset": "FP8", "algorithm": "RTN"},
        calibration={"dataset": str(text), "numSamples": 4, "maxSequenceLength": 64},
    )
    code, term = run(tmp_path, doc)
    assert code == 0 and term["calibration"]["samples"] == 4
    datasets.Dataset.from_dict({"content": CORPUS[:5]}).to_parquet(tmp_path / "calib.parquet")
    doc["spec"]["calibration"] = {"dataset": str(tmp_path / "calib.parquet"), "textField": "content", "numSamples": 5}
    doc["spec"]["output"]["uri"] = str(tmp_path / "out-parquet")
    code, term = run(tmp_path, doc)
    assert code == 0 and term["calibration"]["samples"] == 5
    doc["spec"]["calibration"]["numSamples"] = 6
    doc["spec"]["output"]["uri"] = str(tmp_path / "out-parquet-6")
    code, term = run(tmp_path, doc)
    assert code == 2 and "the dataset yields 5 usable samples" in term["message"]
    doc["spec"]["calibration"] = {"dataset": "self-generated", "numSamples": 3, "maxSequenceLength": 16}
    doc["spec"]["output"]["uri"] = str(tmp_path / "out-self")
    code, term = run(tmp_path, doc)
    events = events_of(capsys.readouterr().out)
    assert code == 0 and term["calibration"] == {"dataset": "self-generated", "samples": 3}
    assert {"event": "stage", "stage": "calibrate", "dataset": "self-generated"} in events
    assert json.loads((tmp_path / "out-self" / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"


def test_hub_model_and_hub_dataset_offline_with_pvc_output(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(llama_dir, cache / "models--acme--tiny" / "snapshots" / revision)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "v1").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = tmp_path / "datasets" / "acme" / "calib"  # a dataset repository's layout, found as hf://acme/calib
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t}]}) for t in CORPUS[:6]))
    monkeypatch.chdir(tmp_path / "datasets")
    monkeypatch.setenv("MODELPRESS_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    doc = job_document(
        "hf://acme/tiny",
        "pvc://models/tiny-fp8",
        recipe={"preset": "FP8", "algorithm": "RTN"},
        calibration={"dataset": "hf://acme/calib", "numSamples": 6, "maxSequenceLength": 32},
    )
    doc["spec"]["model"]["revision"] = "v1"
    chat = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tokenizer_config = cache / "models--acme--tiny" / "snapshots" / revision / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "chat_template": chat}))
    code, term = run(tmp_path, doc)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert term["model"] == {"uri": "hf://acme/tiny", "revision": "v1"} and term["calibration"]["samples"] == 6
    assert (tmp_path / "pvc" / "models" / "tiny-fp8" / "modelpress-manifest.json").is_file()
    assert HF_TOKEN not in out + err

    doc["spec"]["model"]["revision"] = "v2"
    doc["spec"]["output"]["uri"] = "pvc://models/other"
    code, term = run(tmp_path, doc)
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and term["reason"] == "Error"
    assert last == "modelpress: error: RuntimeError: cannot reach the hub for hf://acme/tiny at revision 'v2', and the hub cache lacks it"


SECRET_DOC = {
    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "models-s3"},
    "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_S3_ENDPOINT": "http://127.0.0.1:1"},
}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad-spec", "modelpress: error: invalid CompressionJob: spec.calibration.numSamples: must be ≥ 1 (got 0) (and 1 more problem(s))"),
        ("unknown-modifier", "modelpress: error: spec.recipe: recipe.quant_stage.quant_modifiers: unknown modifier 'NoSuchModifier'"),
        ("no-credentials", "modelpress: error: spec.output.connection: no credentials for connection 'models-s3'; set OUTPUT_AWS_*"),
        ("no-model", "modelpress: error: spec.model.uri: /nowhere/model is not a model directory"),
        ("no-dataset", "modelpress: error: spec.calibration.dataset: /nowhere/calib.jsonl is not a file"),
        ("too-few-samples", "modelpress: error: spec.calibration.numSamples: the dataset yields 4 usable samples"),
        ("no-config-map", "modelpress: error: spec.recipe.configMap: ConfigMap 'recipes' with key 'w8.yaml' not found"),
        ("existing-dir", "modelpress: error: spec.output.uri: "),
        ("not-yaml", "modelpress: error: job: cannot read it (ParserError: while parsing a flow sequence)"),
    ],
)
def test_invalid_input_exits_2_naming_the_field(
    case: str, expected: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    connection_env(monkeypatch, "http://127.0.0.1:1")
    out = tmp_path / "out"
    doc: Any = job_document(str(llama_dir), str(out))
    spec = doc["spec"]
    if case == "bad-spec":
        spec["calibration"] = {"numSamples": 0, "seeed": 1}
    elif case == "unknown-modifier":
        spec["recipe"] = {"modifiers": {"quant_stage": {"quant_modifiers": {"NoSuchModifier": {}}}}}
    elif case == "no-credentials":
        spec["output"] = {"uri": "s3://dst/x", "connection": "models-s3"}
    elif case == "no-model":
        spec["model"]["uri"] = "/nowhere/model"
    elif case == "no-dataset":
        spec["recipe"]["preset"] = "FP8"
        spec["calibration"] = {"dataset": "/nowhere/calib.jsonl"}
    elif case == "too-few-samples":
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:4]))
        spec["recipe"]["preset"] = "FP8"
        spec["calibration"] = {"dataset": str(tmp_path / "c.jsonl"), "numSamples": 16}
    elif case == "no-config-map":
        spec["recipe"] = {"configMap": {"name": "recipes", "key": "w8.yaml"}}
        doc = [doc, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "recipes"}, "data": {"other.yaml": "x"}}]
    elif case == "existing-dir":
        out.mkdir()
        (out / "notes.txt").write_text("someone else's file")
    if case == "not-yaml":
        (tmp_path / "job.yaml").write_text("spec: [unclosed")
        code = main(["run", str(tmp_path / "job.yaml"), "--termination-log", str(tmp_path / "t")])
    else:
        code, term = run(tmp_path, doc)
        assert term["exitCode"] == 2 and term["reason"] in ("InvalidSpec", "InvalidInput")
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines()[-1].startswith(expected), captured.err
    if case == "existing-dir":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


def test_secret_and_config_map_from_local_documents(
    s3_endpoint: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A laptop run: the output connection and the recipe ConfigMap come as documents, not env vars."""
    connection_env(monkeypatch, s3_endpoint)
    s3(s3_endpoint).create_bucket(Bucket="laptop")
    secret = {**SECRET_DOC, "stringData": {**SECRET_DOC["stringData"], "AWS_S3_ENDPOINT": s3_endpoint}}
    recipe = "quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W8A16, ignore: [lm_head]}\n"
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "recipes"}, "data": {"w8.yaml": recipe}}
    (tmp_path / "secrets.yaml").write_text(yaml.safe_dump_all([secret]))
    doc = job_document(str(llama_dir), "s3://laptop/tiny-w8", recipe={"configMap": {"name": "recipes", "key": "w8.yaml"}})
    doc["spec"]["output"]["connection"] = "models-s3"
    code, term = run(tmp_path, [doc, config_map], "--secrets", str(tmp_path / "secrets.yaml"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert term["recipe"]["modifiers"] == ["QuantizationModifier"] and term["output"]["files"] >= 6
    assert SECRET_KEY not in out + err and ACCESS_KEY not in out + err
