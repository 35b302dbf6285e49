"""Parse serving command lines with vLLM's own argument parser, as its OpenAI server does at start.

    python tests/vllm/serve_args.py PLAN.json RESULTS.json

Runs with vLLM's interpreter (like serve_checkpoints.py, it imports nothing of the project). The plan
(written by tests/vllm/test_manifest.py) holds command lines by name and a checkpoint folder; for each
command line the results say whether vLLM's server parser accepts it (or its error, as it prints it),
the values it read for the flags the operator and users set, and, for an accepted one, what vLLM's
engine makes of those settings with the checkpoint in place of the pod's model path (or its error).
"""

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

# The settings a manifest is checked for: the runtime's own flags and those a spec's serve.args set most.
READ = ("model", "port", "served_model_name", "max_model_len", "dtype", "quantization", "gpu_memory_utilization")


def parse(arguments: list[str]) -> tuple[Any, str | None]:
    """vLLM's server parser on `arguments`: its namespace, or None and the error it prints."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            namespace = parser.parse_args(arguments)
        validate_parsed_serve_args(namespace)
    except SystemExit:  # argparse's exit after printing usage and "error: ..."
        lines = [line for line in printed.getvalue().splitlines() if line.strip()]
        return None, lines[-1] if lines else "the parser exited"
    except (TypeError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"
    return namespace, None


def engine(namespace: Any, model: str) -> dict[str, Any]:
    """The engine configuration vLLM builds from the parsed settings, with `model` as the model."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    namespace.model = model
    try:
        config = AsyncEngineArgs.from_cli_args(namespace).create_engine_config()
    except Exception as error:  # vLLM's refusal of the settings is the result, not a crash
        return {"error": f"{type(error).__name__}: {error}"}
    model_config = config.model_config
    return {"max_model_len": model_config.max_model_len, "dtype": str(model_config.dtype).removeprefix("torch."),
            "quantization": model_config.quantization}


def check(plan: dict[str, Any]) -> dict[str, Any]:
    import vllm

    results: dict[str, Any] = {}
    for name, arguments in plan["commands"].items():
        namespace, error = parse(arguments)
        if namespace is None:
            results[name] = {"accepted": False, "error": error}
            continue
        values = {key: getattr(namespace, key, None) for key in READ}
        results[name] = {"accepted": True, "values": values, "engine": engine(namespace, plan["model"])}
    return {"vllm": vllm.__version__, "commands": results}


if __name__ == "__main__":
    plan_file, results_file = map(Path, sys.argv[1:3])
    report = check(json.loads(plan_file.read_text(encoding="utf-8")))
    results_file.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
