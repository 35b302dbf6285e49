"""One llm-compressor `oneshot` on token windows from a file, for benches that compare against it.

    VENV/bin/python bench/peers/llmcompressor_run.py --model DIR --recipe FILE.yaml \
        --windows windows.json --output DIR --report report.json

Run by llm-compressor's own interpreter: it imports llmcompressor and never the project, so the
two never share a process or a dependency set. The windows file (written by bench/held_out.py)
holds the calibration token ids; they go in as a tokenized dataset, all of them, in file order
(no shuffling, no truncation), so this side calibrates on exactly the tokens the other side does.
Wall time and peak RSS are measured by the caller around this process; the report adds the time
of the `oneshot` call alone and the versions.
"""

import argparse
import json
import time
from pathlib import Path

STARTED = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory (safetensors, config, tokenizer)")
    parser.add_argument("--recipe", type=Path, required=True, help="an llm-compressor YAML recipe")
    parser.add_argument("--windows", type=Path, required=True, help="JSON with input_ids: a list of token-id lists")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from driver_report import write_report  # beside this file
    from llmcompressor import oneshot

    windows = json.loads(args.windows.read_text())["input_ids"]
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    imported = time.monotonic()
    oneshot(
        model=str(args.model),
        recipe=str(args.recipe),
        dataset=dataset,
        num_calibration_samples=len(windows),
        max_seq_length=max(len(w) for w in windows),
        shuffle_calibration_samples=False,
        output_dir=str(args.output),
    )
    done = time.monotonic()
    write_report(args.report, "llmcompressor", ("llmcompressor", "compressed-tensors", "transformers", "torch"), STARTED, imported, done)


if __name__ == "__main__":
    main()
