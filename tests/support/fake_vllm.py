"""A stand-in for vLLM's interpreter, so the default tiers run the servable stage without vLLM.

`interpreter(folder, mode)` writes an executable that the runner takes for vLLM's python
(MODELPRESS_VLLM_PYTHON). It answers the runner's probe with VERSION; given the driver and a plan it
writes the driver's report for each checkpoint in the mode asked:

- `serve`: loaded, an answer per prompt, and the token NLL of the plan's windows from the runner's own
  evaluation (so exactly transformers');
- `refuse`: not loaded, with REFUSAL as the error vLLM's log would give;
- `crash`: the traceback's last line on stderr, exit 1; `hang`: starts a worker and sleeps.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

VERSION = "0.32.0+fake"
REFUSAL = "ValueError: Quant type (uint8b128) not supported by CPUWNA16"
CRASH = "ModuleNotFoundError: No module named 'vllm'"


def interpreter(folder: Path, mode: str = "serve") -> Path:
    """An executable standing for vLLM's python."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"fake-vllm-{mode}"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {mode} "$@"\n')
    script.chmod(0o755)
    return script


def report(plan: dict, refuse: bool) -> dict:
    """The driver's report, as vllm_driver.serve_all writes it."""
    checkpoints = {}
    for name, path in plan["checkpoints"].items():
        if refuse:
            checkpoints[name] = {"loaded": False, "error": REFUSAL, "kernels": [], "weight_warnings": [], "dtype_casts": 0}
            continue
        import torch

        from modelpress.engine.streamed_eval import streamed_perplexity

        windows = plan["windows"]
        ids = torch.tensor([token for window in windows for token in window])
        nll = math.log(streamed_perplexity(Path(path), ids, len(windows[0]), torch.device("cpu")))
        checkpoints[name] = {"loaded": True, "quantization": "compressed-tensors", "kernels": ["FakeLinearKernel"],
                             "answers": [f"fake answer to {p}" for p in plan["prompts"]], "nll": nll,
                             "tokens": sum(len(w) - 1 for w in windows), "perplexity": math.exp(nll),
                             "load_seconds": 1.0, "run_seconds": 0.5, "weight_warnings": [], "dtype_casts": 0, "error": None}
    return {"vllm": VERSION, "settings": plan["settings"], "checkpoints": checkpoints}


def main(mode: str, *args: str) -> int:
    if args[0] == "-c":  # the runner's probe
        print(VERSION)
        return 0
    _driver, plan_file, results_file = args
    if mode == "crash":
        print(f"Traceback (most recent call last):\n  ...\n{CRASH}", file=sys.stderr)
        return 1
    if mode == "hang":
        worker = subprocess.Popen(["sleep", "300"])
        Path(plan_file).with_name("worker.pid").write_text(str(worker.pid))
        subprocess.run(["sleep", "300"])
        return 0
    plan = json.loads(Path(plan_file).read_text(encoding="utf-8"))
    Path(results_file).write_text(json.dumps(report(plan, mode == "refuse")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
