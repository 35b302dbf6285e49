"""The vLLM command line the operator's manifests start, read by vLLM's own argument parser.

The operator's pure builders make the ServingRuntime (from the platform's vLLM template) and the
InferenceService for a few specs; KServe starts the runtime container with the runtime's args, then
the InferenceService's model args, `{{.Name}}` replaced by the InferenceService's name. That command
line goes to tests/vllm/serve_args.py under vLLM's interpreter, which parses it with the parser of
vLLM's OpenAI server and builds vLLM's engine configuration from it (the pod's /mnt/models replaced
by SmolLM2). A flag or a value vLLM does not know fails the test, and is shown to fail.
"""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.models import REPO
from support.vllm_tier import TIER, VLLM_PYTHON

pytestmark = TIER

PARSER = Path(__file__).with_name("serve_args.py")
EXAMPLE = REPO / "deploy" / "examples" / "compress-register-serve.yaml"
UID = "0f0f0f0f-0000-4000-8000-000000000019"
# spec.serve.args -> what vLLM must read from the command line (None: the runtime's defaults only)
ACCEPTED: dict[str, tuple[list[str] | None, dict[str, Any]]] = {
    "the example": (None, {"max_model_len": 8192}),
    "no serve args": ([], {"max_model_len": None, "dtype": "auto", "quantization": None}),
    "length, dtype, memory, caching": (["--max-model-len=2048", "--dtype=bfloat16", "--gpu-memory-utilization=0.85",
                                        "--enable-prefix-caching", "--max-num-seqs", "64"],
                                       {"max_model_len": 2048, "dtype": "bfloat16", "gpu_memory_utilization": 0.85}),
    "quantization": (["--quantization=compressed-tensors", "--max-model-len=4096"],
                     {"quantization": "compressed-tensors", "max_model_len": 4096}),
}
# spec.serve.args vLLM's parser refuses, and the words of its refusal
REFUSED = {
    "misspelt flag": (["--max-model-length=4096"], "unrecognized arguments: --max-model-length=4096"),
    "unknown dtype": (["--dtype=bf16"], "invalid choice: 'bf16'"),
}
# accepted by the parser, refused by vLLM's engine for the float SmolLM2 (8,192 positions, not quantized)
SOURCE = {"positions": 8192, "dtype": "bfloat16"}  # SmolLM2's config: what vLLM's engine takes by default
ENGINE_REFUSED = {
    "longer than the model": (["--max-model-len=100000"], "max_model_len"),
}
# --quantization=compressed-tensors on a checkpoint without a quantization_config: vLLM's engine fails
# building its CompressedTensorsConfig (a TypeError, vLLM 0.32), so the flag is checked against the model
ENGINE_REFUSES_FLOAT = {"quantization": "CompressedTensorsConfig"}


def body(serve_args: list[str] | None) -> dict[str, Any]:
    """The example CompressionJob, with its serve args replaced (None: as the example has them)."""
    from support.crd_schema import with_defaults

    cr = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    cr["metadata"].update(namespace="ml", uid=UID)
    if serve_args is not None:
        cr["spec"]["serve"]["args"] = serve_args
    return with_defaults(cr)


def served_command(cr: dict[str, Any]) -> list[str]:
    """The vLLM arguments KServe starts the predictor with, from the operator's two manifests."""
    from modelpress.operator import serving
    from modelpress.operator.validation import parse
    from support.delivery import TEMPLATE

    job = parse(cr)
    name = serving.isvc_name(cr, job)
    runtime = serving.serving_runtime(TEMPLATE, name, cr, owned=False)
    isvc = serving.inference_service(cr, job, "openshift-ai", name, serving.connection_name(cr, job))
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    arguments = [*runtime["spec"]["containers"][0]["args"], *model.get("args", [])]
    return [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in arguments]


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every spec's command line through vLLM's parser and engine configuration, in one vLLM process."""
    from modelpress.runner.smollm2 import smollm2_dir

    root = tmp_path_factory.mktemp("manifest")
    specs = {**{n: a for n, (a, _) in ACCEPTED.items()}, **{n: a for n, (a, _) in {**REFUSED, **ENGINE_REFUSED}.items()}}
    plan = {"commands": {name: served_command(body(args)) for name, args in specs.items()}, "model": str(smollm2_dir())}
    (root / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    done = subprocess.run([VLLM_PYTHON, str(PARSER), str(root / "plan.json"), str(root / "parsed.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the vLLM parser run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads((root / "parsed.json").read_text(encoding="utf-8"))
    for name, result in results["commands"].items():
        result["command"] = plan["commands"][name]
    return results["commands"]


def test_the_command_line_holds_the_runtimes_flags_then_the_specs() -> None:
    assert served_command(body(["--max-model-len=2048"])) == [
        "--port=8080", "--model=/mnt/models", "--served-model-name=qwen2-5-7b-w4a16", "--max-model-len=2048"]


@pytest.mark.parametrize("name", ACCEPTED)
def test_vllm_accepts_the_operators_command_line(name: str, parsed: dict[str, Any]) -> None:
    result, expected = parsed[name], ACCEPTED[name][1]
    assert result["accepted"], f"{name}: vLLM's parser refused {result['command']}: {result['error']}"
    runtime = {"model": "/mnt/models", "port": 8080, "served_model_name": ["qwen2-5-7b-w4a16"]}
    read = {key: result["values"][key] for key in {**runtime, **expected}}
    assert read == {**runtime, **expected}, f"{name}: vLLM read {read} from {result['command']}"


@pytest.mark.parametrize("name", ACCEPTED)
def test_vllms_engine_takes_the_settings(name: str, parsed: dict[str, Any]) -> None:
    """With SmolLM2 in place of /mnt/models: the engine's length and dtype are the ones the spec set."""
    engine, expected = parsed[name]["engine"], ACCEPTED[name][1]
    if name in ENGINE_REFUSES_FLOAT:
        assert "error" in engine and ENGINE_REFUSES_FLOAT[name] in engine["error"], f"{name}: {engine}"
        return
    assert "error" not in engine, f"{name}: vLLM's engine refused {parsed[name]['command']}: {engine['error']}"
    assert engine["max_model_len"] == (expected["max_model_len"] or SOURCE["positions"])
    dtype = expected.get("dtype", "auto")
    assert engine["dtype"] == (SOURCE["dtype"] if dtype == "auto" else dtype)


@pytest.mark.parametrize("name", REFUSED)
def test_vllm_refuses_an_argument_it_does_not_know(name: str, parsed: dict[str, Any]) -> None:
    result = parsed[name]
    assert not result["accepted"], f"{name}: vLLM's parser accepted {result['command']}"
    assert REFUSED[name][1] in result["error"], f"{name}: {result['error']}"


@pytest.mark.parametrize("name", ENGINE_REFUSED)
def test_vllms_engine_refuses_a_setting_the_model_cannot_take(name: str, parsed: dict[str, Any]) -> None:
    result = parsed[name]
    assert result["accepted"], f"{name}: {result['error']}"
    assert ENGINE_REFUSED[name][1] in result["engine"].get("error", ""), f"{name}: vLLM's engine took it: {result['engine']}"
