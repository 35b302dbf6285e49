"""Benchmark oneshot: wall time, peak RSS, output size and quality for a model and recipe, as JSON.

    python bench/oneshot_bench.py [--model DIR] [--recipe W4A16|FILE.yaml] [--group-size 64]
                                  [--forward] [--perplexity] [--output DIR]
                                  [--activation-storage memory|bfloat16|float16|disk] [--spill-dir DIR]

The model defaults to the SmolLM2-135M-Instruct fixture. Calibration takes `--num-samples`
windows of `--max-seq-length` tokens from the first half of `--text` (WikiText-2 validation);
`--perplexity` evaluates the float model and the written checkpoint (loaded through transformers'
compressed-tensors reader) on its second half. `--forward` also times one float forward of the
calibration set through the decoder layers, the unit the pipeline's cost is counted in.
Peak RSS is the process maximum, so it includes the Python and torch runtime (rss_before_mib).
"""

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from modelpress.runner.cli import recipe_argument
from modelpress.engine.oneshot import oneshot
from modelpress.runner.smollm2 import smollm2_dir

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_file(text: Path, into: Path) -> Path:
    """The first half of `text`: calibration never sees the evaluation half."""
    from modelpress.runner.evaluation import text_slice

    path = into / "calibration.txt"
    body = text.read_text(encoding="utf-8")
    path.write_text(text_slice(text, 0.0, len(body) // 2), encoding="utf-8")
    return path


@torch.no_grad()
def float_forward_seconds(model_dir: Path, samples: list[torch.Tensor]) -> float:
    """One forward of the calibration set through the float decoder layers, sample by sample."""
    from transformers import AutoModelForCausalLM

    from modelpress.engine.pipeline import capture_first_layer_inputs, run_layer
    from modelpress.engine.weights import find_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, layers = find_decoder_layers(model)
    inputs = capture_first_layer_inputs(model, layers[0], samples, torch.device("cpu"))
    start = time.monotonic()
    for layer in layers:
        inputs = run_layer(layer, inputs)
    return time.monotonic() - start


def perplexities(model_dir: Path, output: Path, text: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from held_out import load_for_evaluation
    from modelpress.runner.evaluation import perplexity, text_slice

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out = text_slice(text, 0.5)
    float_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = {"float": perplexity(float_model, tokenizer, held_out)}
    del float_model
    result["compressed"] = perplexity(load_for_evaluation(output), tokenizer, held_out)
    result["increase_pct"] = 100 * (result["compressed"] / result["float"] - 1)
    return {k: round(v, 3) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--recipe", default="W4A16")
    parser.add_argument("--group-size", type=int, default=None, help="for a preset; SmolLM2 needs 64")
    parser.add_argument("--observer", choices=["minmax", "mse"], default=None)
    parser.add_argument("--text", type=Path, default=WIKITEXT, help="calibration (first half) and evaluation text")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--output", type=Path, default=Path("out/bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--forward", action="store_true", help="also time one float forward of the calibration set")
    parser.add_argument("--perplexity", action="store_true", help="evaluate float and compressed on the held-out half")
    parser.add_argument("--activation-storage", default="memory", choices=["memory", "bfloat16", "float16", "disk"])
    parser.add_argument("--spill-dir", type=Path, default=Path("out/spill"), help="for --activation-storage disk")
    args = parser.parse_args()

    model = args.model or smollm2_dir()
    recipe = recipe_argument(args.recipe, args.group_size, args.observer)
    shutil.rmtree(args.output, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp())
    dataset = calibration_file(args.text, scratch)
    before = rss_mib()
    start = time.monotonic()
    result = oneshot(
        model=model,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.max_seq_length,
        output_dir=args.output,
        device=args.device,
        activation_storage=args.activation_storage,
        spill_dir=args.spill_dir,
    )
    wall = time.monotonic() - start
    report = {
        "model": str(model),
        "recipe": args.recipe,
        "group_size": args.group_size,
        "calibration": f"{args.num_samples} x {args.max_seq_length} tokens, first half of {args.text.name}",
        "device": args.device,
        "activation_storage": args.activation_storage,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(rss_mib(), 1),
        "rss_before_mib": round(before, 1),
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
        "ratio": round(result.ratio, 3),
        "quantized_modules": result.quantized_modules,
        "sequential_layers": sum(r.sequential for r in result.layers),
        "layers": len(result.layers),
        "gptq_loss": round(sum(v for r in result.layers for v in r.losses.values()), 3),
    }
    if args.forward:
        from transformers import AutoTokenizer

        from modelpress.engine.calibration import calibration_samples

        tokenizer = AutoTokenizer.from_pretrained(model)
        samples = calibration_samples(dataset, tokenizer, args.num_samples, args.max_seq_length)
        report["float_forward_s"] = round(float_forward_seconds(model, samples), 2)
        report["forwards"] = round(wall / report["float_forward_s"], 2)
    if args.perplexity:
        report["perplexity"] = perplexities(model, args.output, args.text)
    shutil.rmtree(scratch)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
