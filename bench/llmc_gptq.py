"""llm-compressor's GPTQ on the very calibration windows ModelPress used, for a side-by-side.

Run with llm-compressor's own venv (it does not import modelpress):

    .venv-llmc/bin/python bench/llmc_gptq.py --model DIR --windows windows.json \
        --symmetric false --group-size 64 --observer minmax --output out/llmc-asym

`windows.json` is what `bench/scales_bench.py windows` writes: the token ids of every calibration
window, in the order ModelPress feeds them. The checkpoint lands in `--output`; `scales_bench.py
perplexity` evaluates it beside ModelPress's own.
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--symmetric", choices=["true", "false"], default="false")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--observer", default="minmax", help="minmax, mse, imatrix_mse")
    parser.add_argument("--actorder", default="static", help="static, weight, or none")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    windows = json.loads(args.windows.read_text())
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": args.symmetric == "true",
        "strategy": "group",
        "group_size": args.group_size,
        "observer": args.observer,
    }
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder=None if args.actorder == "none" else args.actorder,
    )
    start = time.monotonic()
    oneshot(
        model=str(args.model),
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=max(len(w) for w in windows),
        shuffle_calibration_samples=False,
        output_dir=str(args.output),
    )
    print(json.dumps({"output": str(args.output), "wall_s": round(time.monotonic() - start, 1), "weights": weights}))


if __name__ == "__main__":
    main()
