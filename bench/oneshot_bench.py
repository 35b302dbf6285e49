"""Benchmark oneshot: wall time, peak RSS and output size for a model and recipe, as JSON.

    python bench/oneshot_bench.py [--model DIR] [--recipe W4A16|FILE.yaml] [--group-size 64] [--output DIR]

The model defaults to the SmolLM2-135M-Instruct fixture. Peak RSS is the process maximum, so it
includes the Python and torch runtime (reported separately as rss_before_mib).
"""

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path

import torch

from modelpress.runner.cli import recipe_argument
from modelpress.runner.engine.oneshot import oneshot
from modelpress.runner.smollm2 import smollm2_dir


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--recipe", default="W4A16")
    parser.add_argument("--group-size", type=int, default=None, help="for a preset; SmolLM2 needs 64")
    parser.add_argument("--observer", choices=["minmax", "mse"], default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--output", type=Path, default=Path("out/bench"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = args.model or smollm2_dir()
    recipe = recipe_argument(args.recipe, args.group_size, args.observer)
    shutil.rmtree(args.output, ignore_errors=True)
    before = rss_mib()
    start = time.monotonic()
    result = oneshot(
        model=model,
        recipe=recipe,
        dataset=args.dataset,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.max_seq_length,
        output_dir=args.output,
        device=args.device,
    )
    report = {
        "model": str(model),
        "recipe": args.recipe,
        "group_size": args.group_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "wall_s": round(time.monotonic() - start, 2),
        "peak_rss_mib": round(rss_mib(), 1),
        "rss_before_mib": round(before, 1),
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
        "ratio": round(result.ratio, 3),
        "quantized_modules": result.quantized_modules,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
