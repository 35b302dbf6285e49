"""Fixtures for runner tests: moto's S3 server on 127.0.0.1, S3 connections as env vars, job documents."""

import socket
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from support.models import CORPUS, make_model

ACCESS_KEY = "AKIAMODELPRESSTEST01"
SECRET_KEY = "s3cr3t-value-that-must-never-leak-9f8e7d"
HF_TOKEN = "hf_tokenthatmustneverleak0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def connection_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, *roles: str) -> None:
    """An OpenShift AI connection per role, as the operator maps it into the pod (prefixed keys)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ENDPOINT", "AWS_S3_BUCKET", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for role in roles:
        prefix = {"model": "MODEL_", "data": "DATA_", "output": "OUTPUT_"}[role]
        monkeypatch.setenv(f"{prefix}AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv(f"{prefix}AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        monkeypatch.setenv(f"{prefix}AWS_S3_ENDPOINT", endpoint)
        monkeypatch.setenv(f"{prefix}AWS_DEFAULT_REGION", "us-east-1")


def upload_dir(client: Any, bucket: str, prefix: str, src: Path) -> None:
    client.create_bucket(Bucket=bucket)
    for path in sorted(src.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(src).as_posix()}")


def job_document(model: str, output: str, **spec: Any) -> dict[str, Any]:
    """A CompressionJob: RTN W4A16 by default, other spec sections as given."""
    body = {"model": {"uri": model}, "recipe": {"preset": "W4A16", "algorithm": "RTN"}, "output": {"uri": output}}
    body.update(spec)
    return {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "tiny"}, "spec": body}


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny Llama trained briefly on CORPUS, so quantization measurably raises its perplexity."""
    out = make_model("llama", tmp_path_factory.mktemp("trained"), tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(" ".join(CORPUS[:4]) * 3, return_tensors="pt")["input_ids"][:, :128]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out
