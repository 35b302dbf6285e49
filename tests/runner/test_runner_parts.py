"""Runner parts on their own: connections, scrubbing, termination messages, recipes, self-generated data, the pod entry."""

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelpress.contract import ExitCode, FailureEvent, ResultEvent
from modelpress.runner.connections import LocalObjects, local_objects, s3_connection, scrub, secret_values
from modelpress.runner.data import self_generated
from modelpress.engine.errors import ModelPressError
from modelpress.engine.recipe import parse_recipe
from modelpress.runner.progress import TERMINATION_LIMIT, Reporter, ScrubFilter, termination_message
from modelpress.runner.presets import ALGORITHM_MODIFIERS, preset_document
from support.s3 import job_document

SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "models-s3"},
          "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"from-secret").decode(), "AWS_S3_ENDPOINT": base64.b64encode(b"https://s3.local").decode()},
          "stringData": {"AWS_SECRET_ACCESS_KEY": "secret-from-secret"}}


def test_connection_resolution_order() -> None:
    objects = local_objects([SECRET, {"kind": "Pod"}])
    plain = {"AWS_ACCESS_KEY_ID": "plain", "AWS_S3_ENDPOINT": "https://plain"}
    prefixed = {**plain, "OUTPUT_AWS_ACCESS_KEY_ID": "prefixed", "OUTPUT_AWS_S3_ENDPOINT": "https://out", "OUTPUT_AWS_S3_USE_PATH_STYLE": "false"}
    out = s3_connection("output", "models-s3", prefixed, objects, "spec.output.connection")
    assert (out.access_key_id, out.endpoint, out.path_style) == ("prefixed", "https://out", False)
    named = s3_connection("model", "models-s3", prefixed, objects, "spec.model.connection")
    assert (named.access_key_id, named.secret_access_key, named.endpoint) == ("from-secret", "secret-from-secret", "https://s3.local")
    fallback = s3_connection("data", None, plain, objects, "spec.calibration.connection")
    assert (fallback.access_key_id, fallback.endpoint) == ("plain", "https://plain")
    assert "from-secret" not in repr(named) and "secret-from-secret" not in repr(named)
    with pytest.raises(ModelPressError, match=r"^spec.output.connection: no credentials for connection 'gone'; set OUTPUT_AWS_\*"):
        s3_connection("output", "gone", {}, objects, "spec.output.connection")
    with pytest.raises(ModelPressError, match="AWS_S3_ENDPOINT must be a URL"):
        s3_connection("model", None, {"AWS_S3_ENDPOINT": "s3.local:9000"}, LocalObjects(), "spec.model.connection")


def test_scrubbing_covers_output_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    objects = local_objects([SECRET])
    conn = s3_connection("model", "models-s3", {}, objects, "spec.model.connection")
    secrets = secret_values([conn], "hf_abcdefgh")
    assert scrub("key secret-from-secret token hf_abcdefgh id from-secret", secrets) == "key *** token *** id ***"
    reporter = Reporter(json_lines=True, bars=False, out=open(os.devnull, "w"))
    reporter.secrets = secrets
    logger = logging.getLogger("modelpress.test.scrub")
    caplog.handler.addFilter(ScrubFilter(reporter))
    with caplog.at_level(logging.WARNING):
        logger.warning("refused with %s", "secret-from-secret")
    assert caplog.records[-1].getMessage() == "refused with ***"


def test_termination_message_fits_kubernetes_limit() -> None:
    sizes = {"originalBytes": 100, "compressedBytes": 32, "ratio": 3.1}
    result = ResultEvent.model_validate({
        "output": {"uri": "s3://b/p"}, "answers": [{"prompt": "p", "original": "a", "compressed": "b"}],
        "sizes": sizes, "versions": {f"pkg{i}": "x" * 100 for i in range(60)}})
    text = termination_message(result)
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert json.loads(text) == {"event": "result", "status": "Succeeded", "output": {"uri": "s3://b/p"}, "sizes": sizes}
    small = termination_message(ResultEvent.model_validate({"answers": [], "metrics": {"perplexityOriginal": 1}}))
    assert json.loads(small) == {"event": "result", "status": "Succeeded", "metrics": {"perplexityOriginal": 1.0}}
    failure = FailureEvent(reason="InvalidSpec", exit_code=ExitCode.INVALID_INPUT, message="m" * 5000, versions={"a": "x" * 100})
    kept = termination_message(failure)
    assert len(kept.encode()) <= TERMINATION_LIMIT and kept.startswith('{"event":"failure","status":"Failed","reason":"InvalidSpec","exitCode":2')
    # characters of three bytes: the limit is in bytes, and the message is shortened so the JSON stays whole
    wide = FailureEvent(reason="InvalidSpec", exit_code=ExitCode.INVALID_INPUT, message="spec.x: must be ≥ 1 " * 400)
    text = termination_message(wide)
    assert len(text.encode()) <= TERMINATION_LIMIT
    parsed = json.loads(text)
    assert parsed["exitCode"] == 2 and parsed["message"].startswith("spec.x: must be ≥ 1") and parsed["message"].endswith("...")


def test_preset_documents_are_llm_compressor_recipes() -> None:
    doc = preset_document("W4A16", "SparseGPT+GPTQ", ["lm_head"])
    assert doc == {
        "sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4", "ignore": ["lm_head"]}}},
        "quant_stage": {"quant_modifiers": {"GPTQModifier": {"scheme": "W4A16", "ignore": ["lm_head"]}}},
    }
    smooth = preset_document("W8A8", "SmoothQuant+GPTQ", ["lm_head"])["quant_stage"]["quant_modifiers"]
    assert list(smooth) == ["SmoothQuantModifier", "GPTQModifier"] and smooth["SmoothQuantModifier"] == {"smoothing_strength": 0.8}
    assert set(ALGORITHM_MODIFIERS) == {"RTN", "GPTQ", "AWQ", "SmoothQuant+GPTQ", "SparseGPT+GPTQ"}
    awq = preset_document("W4A16", "AWQ", ["lm_head"])["quant_stage"]["quant_modifiers"]
    assert awq == {"AWQModifier": {}, "QuantizationModifier": {"scheme": "W4A16", "ignore": ["lm_head"]}}
    grouped = parse_recipe(preset_document("W4A16_ASYM", "RTN", ["lm_head"], group_size=64))
    weights = grouped[0].groups["group_0"].weights
    assert (weights.group_size, weights.symmetric, grouped[0].ignore) == (64, False, ["lm_head"])
    with pytest.raises(ModelPressError, match="preset W8A8 is not grouped"):
        preset_document("W8A8", "RTN", [], group_size=64)


def test_self_generated_samples_are_fixed_length_and_seeded(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = self_generated(model, tokenizer, 3, 12, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert [s.shape for s in first] == [torch.Size([1, 12])] * 3
    assert all(s[0, 0].item() == tokenizer.bos_token_id for s in first)
    again = self_generated(model, tokenizer, 3, 12, seed=7)
    other = self_generated(model, tokenizer, 3, 12, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_pod_entry_reads_the_spec_from_env(llama_dir: Path, tmp_path: Path) -> None:
    doc = job_document(str(llama_dir), str(tmp_path / "out"), evaluation={"prompts": ["Paris is"], "maxNewTokens": 3})
    env = {**os.environ, "MODELPRESS_SPEC": json.dumps(doc), "MODELPRESS_SCRATCH": str(tmp_path / "scratch"),
           "MODELPRESS_TERMINATION_LOG": str(tmp_path / "term")}
    done = subprocess.run([sys.executable, "-m", "modelpress.runner"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert (lines[0]["event"], lines[0]["stage"]) == ("progress", "preflight")  # the memory estimate, before the fetch
    assert [s["stage"] for s in lines[0]["memory"]["stages"]] == ["runtime", "answers", "compress", "compressed answers"]
    assert lines[1] == {"event": "stage", "stage": "fetch", "uri": str(llama_dir)} and lines[-1]["event"] == "result"
    assert json.loads((tmp_path / "term").read_text())["output"]["uri"] == str(tmp_path / "out")

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**doc, "kind": "TrainJob"}))
    env = {**env, "MODELPRESS_SPEC_FILE": str(spec_file)}
    del env["MODELPRESS_SPEC"]
    done = subprocess.run([sys.executable, "-m", "modelpress.runner", "run"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "modelpress: error: invalid CompressionJob: kind: must be one of 'CompressionJob' (got 'TrainJob')"
    assert json.loads((tmp_path / "term").read_text())["problems"] == ["kind: must be one of 'CompressionJob' (got 'TrainJob')"]
