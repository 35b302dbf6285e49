"""One ModelPress `oneshot` on token windows from a file: the same arguments as the other peers' drivers.

    .venv/bin/python bench/peers/modelpress_run.py --model DIR --recipe FILE.yaml \
        --windows windows.json --output DIR --report report.json

The windows go in as lists of token ids, all of them and nothing else, the tokens
llmcompressor_run.py gives llm-compressor as a tokenized dataset (`oneshot` takes token ids as
they are, so neither `datasets` nor the tokenizer is loaded: about 140 MiB less resident). Wall time and peak RSS are measured by the caller around this
process; the report adds the time of the `oneshot` call alone and the versions.
"""

import argparse
import json
import time
from pathlib import Path

STARTED = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from driver_report import write_report  # beside this file
    from modelpress.engine.oneshot import oneshot

    windows = json.loads(args.windows.read_text())["input_ids"]
    imported = time.monotonic()
    result = oneshot(
        model=args.model,
        recipe=args.recipe,
        dataset=windows,
        num_calibration_samples=len(windows),
        max_seq_length=max(len(w) for w in windows),
        output_dir=args.output,
        device=args.device,
    )
    done = time.monotonic()
    write_report(args.report, "modelpress", ("modelpress", "compressed-tensors", "transformers", "torch"), STARTED, imported, done,
                 layer_s=[round(r.seconds, 3) for r in result.layers])


if __name__ == "__main__":
    main()
