"""Permanent input errors: exit 2 with one line naming the field or file and the fix, no traceback
(unless --debug), nothing published, and no secret repeated on stderr or in the termination log."""

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest
import torch
import yaml
from moto.core.authorization import enable_iam_authentication

from modelpress.engine.errors import ModelPressError
from modelpress.engine.recipe import load_recipe
from modelpress.engine.weights import SafetensorsSource
from modelpress.runner import cli
from modelpress.runner.cli import main, read_documents
from support.hostile import AWS_KEY_ID, AWS_SECRET, HF_TOKEN, alias_bomb, bomb_job
from support.s3 import ACCESS_KEY, SECRET_KEY, connection_env, job_document, s3, upload_dir


def run_job(tmp_path: Path, doc: Any, *extra: str) -> tuple[int, dict[str, Any]]:
    """`modelpress run` on a job document; (exit code, termination message)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all(doc) if isinstance(doc, list) else yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    code = main(["run", str(job), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term), "--format", "json",
                 *extra])
    return code, json.loads(term.read_text())


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The single line a permanent error leaves on stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("modelpress: error: ")
    return err.strip().removeprefix("modelpress: error: ")


# --- damaged models -------------------------------------------------------------------------------


def _truncate(model: Path) -> None:
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: -200 * 1024])


def _header_bytes(model: Path) -> None:
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"{not json" + data[17:])


def _huge_header(model: Path) -> None:
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _garbage_config(model: Path) -> None:
    (model / "config.json").write_text("{'model_type': llama,,")


def _unknown_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))


def _no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "model.safetensors: holds {size} bytes but tensor "),
    "corrupt-header": (_header_bytes, "model.safetensors: its header is not a JSON object of tensors; the file is damaged"),
    "header-2^40": (_huge_header, "model.safetensors: its header claims 1099511627776 bytes but the file holds {size}"),
    "garbage-config": (_garbage_config, "config.json is not valid JSON (Expecting property name enclosed in double quotes"),
    "unknown-model-type": (_unknown_type, "config.json has model_type 'frobnicator', which transformers"),
    "no-tokenizer": (_no_tokenizer, "no tokenizer (tokenizer.json, tokenizer.model, vocab.json, tokenizer.tiktoken) beside"),
}


@pytest.fixture
def damaged(request: pytest.FixtureRequest, llama_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the tiny Llama, damaged as the test's `case` parameter says; (model, expected message)."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    spoil, expected = DAMAGE[request.param]
    spoil(model)
    return model, expected.format(size=(model / "model.safetensors").stat().st_size)


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_a_damaged_model_stops_the_job_before_any_work(
    damaged: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, expected = damaged
    began = time.monotonic()
    code, term = run_job(tmp_path, job_document(str(model), str(tmp_path / "out")))
    line = one_error_line(capsys)
    assert code == 2 and term["exitCode"] == 2 and term["reason"] == "InvalidInput"
    assert line.startswith(f"spec.model.uri: {expected}"), line
    assert term["message"] == line and not (tmp_path / "out").exists()
    assert time.monotonic() - began < 20


@pytest.mark.parametrize("damaged", ["truncated", "header-2^40", "garbage-config", "unknown-model-type"], indirect=True)
def test_compress_names_the_damaged_file(damaged: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, expected = damaged
    code = main(["compress", "--model", str(model), "--recipe", "W4A16", "--group-size", "64", "--output", str(tmp_path / "o")])
    assert code == 2 and one_error_line(capsys).startswith(f"model: {expected}")


def test_every_tensor_read_is_checked_for_its_length(llama_dir: Path, tmp_path: Path) -> None:
    """A shard cut short after its header was read (a file replaced under the job) is a short read, not garbage."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    source = SafetensorsSource(model)
    last = max(source.entries, key=lambda name: source.entries[name][3])
    assert torch.isfinite(source.get(last)).all()
    _truncate(model)
    with pytest.raises(ModelPressError, match=rf"^model: model.safetensors: tensor {last} is cut short \(\d+ of \d+ bytes\)"):
        source.get(last)


# --- the job file, Secrets and S3 -----------------------------------------------------------------


def test_an_alias_bomb_is_refused_where_the_job_is_read_and_where_a_recipe_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "bomb.yaml"
    job.write_text(bomb_job())
    began = time.monotonic()
    with pytest.raises(ModelPressError, match=r"^job: document 1: too many values; at most 10000 values \(each use of a YAML"):
        read_documents(str(job), {})
    bomb, _ = alias_bomb()
    with pytest.raises(ModelPressError, match=r"^recipe: too many values; at most 10000 values"):
        load_recipe(bomb + "quant_stage: {quant_modifiers: {QuantizationModifier: {scheme: W4A16, ignore: *l6}}}\n")
    assert time.monotonic() - began < 0.5
    assert main(["run", str(job), "--termination-log", str(tmp_path / "t")]) == 2
    assert one_error_line(capsys).startswith("job: document 1: too many values")


def test_a_job_file_is_size_limited(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "big.yaml"
    job.write_text("# padding\n" * 200_000)
    assert main(["run", str(job), "--termination-log", str(tmp_path / "t")]) == 2
    assert one_error_line(capsys) == f"job: {job} holds 2000000 bytes; a job file holds at most 1048576 (1 MiB)"


@pytest.mark.parametrize("value", [HF_TOKEN, AWS_SECRET, "bm90IHRleHQ"])
def test_bad_base64_in_a_secret_names_the_key_not_the_value(
    value: str, llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "models-s3"},
              "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(AWS_KEY_ID.encode()).decode(), "AWS_SECRET_ACCESS_KEY": value}}
    doc = job_document(str(llama_dir), "s3://dst/x")
    doc["spec"]["output"]["connection"] = "models-s3"
    code, term = run_job(tmp_path, [doc, secret])
    line = one_error_line(capsys)
    assert code == 2 and line == ("Secret 'models-s3': data.'AWS_SECRET_ACCESS_KEY' is not base64 of text; encode the value "
                                  "(base64 -w0) or put it under stringData")
    assert value not in json.dumps(term) and AWS_KEY_ID not in json.dumps(term)


def test_a_token_typed_into_a_secret_name_is_never_repeated(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = job_document("hf://acme/tiny", str(tmp_path / "out"))
    doc["spec"]["model"]["tokenSecret"] = {"name": HF_TOKEN, "key": "HF_TOKEN"}
    code, term = run_job(tmp_path, doc)
    line = one_error_line(capsys)
    assert code == 2 and line.startswith("invalid CompressionJob: spec.model.tokenSecret.name: a value shaped like a secret (not shown)")
    assert HF_TOKEN not in line and HF_TOKEN not in (tmp_path / "termination-log").read_text()
    assert term["problems"] == [line.removeprefix("invalid CompressionJob: ")]


@pytest.fixture(scope="session")
def iam_keys(s3_endpoint: str) -> tuple[str, str]:
    """An IAM user's real access key in moto, which then checks every request's signature."""
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    iam.create_user(UserName="modelpress-test")
    key = iam.create_access_key(UserName="modelpress-test")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.parametrize(("keys", "code", "fix"), [
    ("unknown", "InvalidAccessKeyId", "the endpoint does not know the access key; check AWS_ACCESS_KEY_ID in the Secret"),
    ("wrong-secret", "SignatureDoesNotMatch", "the secret key does not belong to the access key; check AWS_SECRET_ACCESS_KEY in the Secret"),
])
def test_wrong_s3_keys_exit_2_naming_the_connection(
    keys: str, code: str, fix: str, iam_keys: tuple[str, str], s3_endpoint: str, llama_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    s3(s3_endpoint).create_bucket(Bucket="keys")
    key_id, _ = iam_keys
    used_id, used_secret = (AWS_KEY_ID, AWS_SECRET) if keys == "unknown" else (key_id, AWS_SECRET)
    connection_env(monkeypatch, s3_endpoint, "output")
    monkeypatch.setenv("OUTPUT_AWS_ACCESS_KEY_ID", used_id)
    monkeypatch.setenv("OUTPUT_AWS_SECRET_ACCESS_KEY", used_secret)
    with enable_iam_authentication():
        exit_code, term = run_job(tmp_path, job_document(str(llama_dir), "s3://keys/tiny"))
    line = one_error_line(capsys)
    assert exit_code == 2 and term["reason"] == "InvalidInput"
    assert line == f"spec.output.connection: S3 refused PutObject ({code}): {fix}"  # the write probe, before any compute
    assert used_id not in json.dumps(term) + line and used_secret not in json.dumps(term) + line


@pytest.mark.parametrize("role", ["output", "model"])
def test_a_bucket_that_does_not_exist_exits_2_naming_the_uri(
    role: str, s3_endpoint: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture
) -> None:
    connection_env(monkeypatch, s3_endpoint, "model", "output")
    upload_dir(s3(s3_endpoint), "there", "models/tiny", llama_dir)
    model, output = ("s3://there/models/tiny", "s3://nowhere/tiny") if role == "output" else ("s3://nowhere/models/tiny", "s3://there/out")
    code, term = run_job(tmp_path, job_document(model, output))
    line = one_error_line(capsys)
    call = "PutObject" if role == "output" else "ListObjectsV2"  # the output's write probe comes first
    assert code == 2 and line == (f"spec.{role}.uri: S3 refused {call} (NoSuchBucket): bucket 'nowhere' does not exist at "
                                  f"{s3_endpoint}; create it, or fix the bucket in the URI")
    assert "objects" not in json.dumps(term) and SECRET_KEY not in json.dumps(term)


# --- tracebacks only with --debug -----------------------------------------------------------------


def test_tracebacks_only_with_debug(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    _unknown_type(model)
    doc = job_document(str(model), str(tmp_path / "out"))
    assert run_job(tmp_path, doc)[0] == 2 and "frobnicator" in one_error_line(capsys)
    assert run_job(tmp_path, doc, "--debug")[0] == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("modelpress: error: spec.model.uri:")

    def broken(*args: Any) -> None:
        raise ConnectionResetError("peer went away\nsecond line")

    monkeypatch.setattr("modelpress.runner.run.run_job", broken)
    code, term = run_job(tmp_path, job_document(str(llama_dir), str(tmp_path / "out")))
    assert code == 1 and term["reason"] == "Error" and one_error_line(capsys) == "ConnectionResetError: peer went away"
    assert run_job(tmp_path, job_document(str(llama_dir), str(tmp_path / "out")), "--debug")[0] == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    monkeypatch.setattr(cli, "compress", broken)
    assert main(["compress", "--model", "m", "--recipe", "W4A16", "--output", str(tmp_path / "o")]) == 1
    assert one_error_line(capsys) == "ConnectionResetError: peer went away"
    assert main(["compress", "--model", "m", "--recipe", "W4A16", "--output", str(tmp_path / "o"), "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
