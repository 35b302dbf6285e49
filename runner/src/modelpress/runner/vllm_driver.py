"""Load checkpoints in vLLM, one after another in one process, and say what vLLM made of each.

    python PATH/TO/vllm_driver.py PLAN.json RESULTS.json

Run by the interpreter of vLLM's own environment, never the project's, as a file path: it imports
the standard library and vLLM only, nothing of modelpress. The runner's servable stage
(`spec.evaluation.servable`) and the vLLM test tier both run it. The plan names the checkpoints, the
`LLM(...)` settings, the prompts (through the chat template unless `chat` is false) and the token
windows to score; for each checkpoint the results hold whether it loaded (or vLLM's own error), the
quantization method and the linear kernels vLLM reports, the weight warnings in its log, the greedy
answers and the token NLL of the windows from prompt log-probabilities. Each checkpoint's log
(engine and worker processes included) is kept in the plan's log folder.
"""

import contextlib
import gc
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# "(Worker pid=12) WARNING 12-01 12:42:14 [utils.py:333] message": the process tag and the source are optional.
LOG_LINE = re.compile(r"^(?:\((?P<process>[^)]*)\)\s+)?(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\] (?P<message>.*)$")
# "Using CPUWNA16LinearKernel for CompressedTensorsWNA16", "Selected CPUInt8ScaledMMLinearKernel for ...":
# the linear kernel vLLM chose for a quantized layer.
KERNEL = re.compile(r"(?:Using|Selected) (?P<kernel>\w+LinearKernel) for ")
# A floating weight vLLM read into a floating parameter of another precision: a rounding, not a lost
# weight. A cast into an integer parameter (a packed weight, a zero point) changes the numbers: a warning.
FLOAT = r"torch\.(?:bfloat16|float16|float32|float64)"
CAST = re.compile(rf"Attempted to load weight \S+ with dtype {FLOAT} into parameter with dtype {FLOAT}$")
WEIGHT_WORDS = re.compile(r"weight|parameter|checkpoint|tensor", re.IGNORECASE)
# The last line of a Python traceback: "ValueError: ...", "RuntimeError: ...", or a bare "AssertionError".
EXCEPTION = re.compile(r"^[A-Za-z_.]*(?:Error|Exception)(?:: |$)")
# The marker line under the failing expression of a traceback: "    ^^^^^^^^".
CARETS = re.compile(r"^\s*[~^]+\s*$")


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, and so every process it starts, to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def entries(text: str) -> list[tuple[str, str, str]]:
    """(process, level, message) per log line; a line that is not a log record is its own message."""
    parsed = []
    for line in text.splitlines():
        entry = LOG_LINE.match(line)
        parsed.append((entry["process"] or "", entry["level"], entry["message"]) if entry else ("", "", line))
    return parsed


def first_error(log: list[tuple[str, str, str]]) -> str | None:
    """The first exception in the log with the indented lines that continue it (vLLM lists reasons so)."""
    for index, (process, _, message) in enumerate(log):
        if EXCEPTION.match(message):
            parts = [message.strip()]
            if ":" not in message:  # a bare exception: the statement that raised it says what failed
                source = [m for p, _, m in log[:index] if p == process and m.strip() and not CARETS.match(m)]
                parts += [f"at `{source[-1].strip()}`"] if source else []
            for later_process, _, later in log[index + 1 :]:
                if later_process != process or not later[:1].isspace():
                    break
                parts.append(later.strip())
            return " ".join(parts)
    return None


def read_log(text: str) -> dict[str, Any]:
    """What a checkpoint's log says: kernels chosen, weight warnings, casts, and the first error if any."""
    log = entries(text)
    kernels = sorted({found["kernel"] for _, _, message in log if (found := KERNEL.search(message))})
    warnings = [m for _, level, m in log if level == "WARNING" and WEIGHT_WORDS.search(m) and not CAST.search(m)]
    casts = sum(1 for _, level, m in log if level == "WARNING" and CAST.search(m))
    return {"kernels": kernels, "weight_warnings": warnings, "dtype_casts": casts, "error": first_error(log)}


def token_nll(llm: Any, windows: list[list[int]]) -> dict[str, float]:
    """Mean NLL of every window's tokens after its first, from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(prompt_logprobs=0, max_tokens=1), use_tqdm=False)
    total, count = 0.0, 0
    for window, output in zip(windows, outputs):
        for position in range(1, len(window)):
            total -= output.prompt_logprobs[position][window[position]].logprob
            count += 1
    return {"nll": total / count, "tokens": count, "perplexity": math.exp(total / count)}


def answers(llm: Any, prompts: list[str], max_tokens: int, chat: bool = True) -> list[str]:
    """Greedy answers, through the checkpoint's chat template when `chat` (a model without one gets the prompt as it is)."""
    from vllm import SamplingParams

    if not prompts:
        return []
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], greedy, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, greedy, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outputs]


def serve_one(path: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Load one checkpoint and run the prompts and the windows; an exception means it did not load or run."""
    from vllm import LLM

    start = time.monotonic()
    llm = LLM(model=path, **plan["settings"])
    loaded = time.monotonic()
    try:
        result = {
            "quantization": llm.llm_engine.model_config.quantization,
            "load_seconds": round(loaded - start, 1),
            "answers": answers(llm, plan["prompts"], plan["max_tokens"], plan.get("chat", True)),
        }
        if plan["windows"]:
            result.update(token_nll(llm, plan["windows"]))
        result["run_seconds"] = round(time.monotonic() - loaded, 1)
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def serve_all(plan: dict[str, Any]) -> dict[str, Any]:
    import vllm

    logs = Path(plan["log_dir"])
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, path in plan["checkpoints"].items():
        log = logs / f"{name}.log"
        outcome: dict[str, Any] = {"loaded": False}
        with output_to(log):
            try:
                outcome.update(serve_one(path, plan), loaded=True)
            except Exception as error:  # vLLM's refusal is a result to report, not a crash of the driver
                outcome["exception"] = f"{type(error).__name__}: {error}"
        outcome.update(read_log(log.read_text(encoding="utf-8", errors="replace")), log=str(log))
        results[name] = outcome
        print(f"{name}: {'loaded' if outcome['loaded'] else 'refused'}", flush=True)
    return {"vllm": vllm.__version__, "settings": plan["settings"], "checkpoints": results}


if __name__ == "__main__":  # the engine starts worker processes, which import this file again
    plan_file, results_file = map(Path, sys.argv[1:3])
    report = serve_all(json.loads(plan_file.read_text(encoding="utf-8")))
    results_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
