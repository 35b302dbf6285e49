"""Scale choice and column order for GPTQ W4A16 g64: perplexity ratios to float, and the observers' cost.

    python bench/scales_bench.py windows out/scales/windows.json      # the calibration windows, for llm-compressor
    python bench/scales_bench.py matrix --output bench/scales.json     # GPTQ sym/asym x observer x order
    python bench/scales_bench.py perplexity out/llmc-asym ...          # any checkpoints, on the same held-out text
    python bench/scales_bench.py cost --output bench/scales_cost.json  # gptq() per observer on one SmolLM2-sized stack

Calibration: `--num-samples` windows of `--max-seq-length` tokens from the first half of WikiText-2's
validation text (the windows `oneshot` cuts from it, also written by `windows` for other engines);
perplexity on the second half, which calibration never sees (oneshot_bench.perplexities). Each
matrix entry is appended to the JSON as it finishes, so a partial run keeps what it measured.
`--layer-path whole` calibrates every Linear of a decoder layer on the float layer's activations
before any is quantized (llm-compressor's order) instead of group by group (true sequential).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from oneshot_bench import WIKITEXT, calibration_file

from modelpress.engine.gptq import GPTQModifier, gptq
from modelpress.engine.oneshot import oneshot
from modelpress.engine.quantize import weight_observer
from modelpress.runner.smollm2 import smollm2_dir

OBSERVERS = ["minmax", "mse", "imatrix_mse"]
ORDERS = ["static", "group_aware"]


def write_windows(out: Path, num_samples: int, max_seq_length: int) -> None:
    """The token ids of the windows `oneshot` calibrates on, in its order."""
    from transformers import AutoTokenizer

    from modelpress.engine.calibration import calibration_samples

    scratch = Path(tempfile.mkdtemp())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    samples = calibration_samples(calibration_file(WIKITEXT, scratch), tokenizer, num_samples, max_seq_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([s[0].tolist() for s in samples]))
    shutil.rmtree(scratch)


def perplexity_of(model_dir: Path, checkpoint: Path | None = None) -> float:
    """Perplexity on the held-out half: the float model, or a weight-only checkpoint dequantized
    while loading (transformers' compressed loader refuses asymmetric int4; see model_card.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from modelpress.runner.evaluation import perplexity, text_slice

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if checkpoint is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        return round(perplexity(model.float(), tokenizer, text_slice(WIKITEXT, 0.5)), 4)


def gptq_recipe(symmetric: bool, observer: str, actorder: str, group_size: int) -> GPTQModifier:
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        weight_observer=observer,
        actorder=actorder,
    )


def matrix(args: argparse.Namespace) -> None:
    model = smollm2_dir()
    scratch = Path(tempfile.mkdtemp())
    dataset = calibration_file(WIKITEXT, scratch)
    report = json.loads(args.output.read_text()) if args.output.is_file() else {"runs": []}
    report.update(
        model="SmolLM2-135M-Instruct",
        calibration=f"{args.num_samples} x {args.max_seq_length} tokens, first half of {WIKITEXT.name}",
        evaluation="perplexity on its second half: 8192 tokens in windows of 512 (runner.evaluation.perplexity)",
        threads=torch.get_num_threads(),
    )
    if "float_perplexity" not in report:
        report["float_perplexity"] = perplexity_of(model)
    if args.layer_path == "whole":
        import modelpress.engine.pipeline as pipeline

        pipeline.compress_layer_sequential = lambda *_args, **_kw: None  # every layer takes the generic path
    done = {(r["symmetric"], r["observer"], r["actorder"], r.get("layer_path", "sequential")) for r in report["runs"]}
    for symmetric in args.symmetric:
        for actorder in args.orders:
            for observer in args.observers:
                if (symmetric, observer, actorder, args.layer_path) in done:
                    continue
                out = scratch / "model"
                start = time.monotonic()
                oneshot(
                    model=model,
                    recipe=gptq_recipe(symmetric, observer, actorder, args.group_size),
                    dataset=dataset,
                    num_calibration_samples=args.num_samples,
                    max_seq_length=args.max_seq_length,
                    output_dir=out,
                )
                wall = time.monotonic() - start
                ppl = perplexity_of(model, out)
                run = {
                    "symmetric": symmetric,
                    "observer": observer,
                    "actorder": actorder,
                    "group_size": args.group_size,
                    "layer_path": args.layer_path,
                    "wall_s": round(wall, 1),
                    "perplexity": ppl,
                    "ratio": round(ppl / report["float_perplexity"], 4),
                }
                report["runs"].append(run)
                args.output.write_text(json.dumps(report, indent=2) + "\n")
                print(json.dumps(run), flush=True)
                shutil.rmtree(out)
    shutil.rmtree(scratch)


def evaluate(args: argparse.Namespace) -> None:
    model = smollm2_dir()
    base = perplexity_of(model)
    for path in args.checkpoints:
        ppl = perplexity_of(model, path)
        print(json.dumps({"checkpoint": str(path), "float": base, "perplexity": ppl, "ratio": round(ppl / base, 4)}))


def cost(args: argparse.Namespace) -> None:
    """gptq() on a stack as wide as SmolLM2's gate/up (3072 x 576) with a Hessian of real shape,
    per observer and order: the scale search's share of the sweep."""
    from compressed_tensors.quantization import QuantizationArgs

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 576, generator=gen) * 0.02
    x = torch.randn(8192, 576, generator=gen) * torch.rand(576, generator=gen).square() * 4
    h = 2 * x.T @ x / x.shape[0]
    runs = []
    for symmetric in (True, False):
        qargs = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64)
        for actorder in ORDERS:
            for observer in OBSERVERS:
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    gptq(w, h, qargs, actorder=actorder, observer=weight_observer(observer), importance=torch.diag(h) / 2)
                    times.append(time.perf_counter() - start)
                runs.append({"symmetric": symmetric, "actorder": actorder, "observer": observer, "best_s": round(min(times), 3)})
                print(json.dumps(runs[-1]), flush=True)
    report = {"weight": [3072, 576], "group_size": 64, "threads": torch.get_num_threads(), "repeats": args.repeats, "runs": runs}
    args.output.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("windows")
    w.add_argument("output", type=Path)
    m = sub.add_parser("matrix")
    m.add_argument("--output", type=Path, default=Path("bench/scales.json"))
    m.add_argument("--symmetric", type=lambda v: v == "true", nargs="+", default=[True, False])
    m.add_argument("--observers", nargs="+", default=OBSERVERS)
    m.add_argument("--orders", nargs="+", default=ORDERS)
    m.add_argument("--layer-path", choices=["sequential", "whole"], default="sequential")
    p = sub.add_parser("perplexity")
    p.add_argument("checkpoints", type=Path, nargs="+")
    c = sub.add_parser("cost")
    c.add_argument("--output", type=Path, default=Path("bench/scales_cost.json"))
    c.add_argument("--repeats", type=int, default=3)
    for s in (w, m):
        s.add_argument("--num-samples", type=int, default=128)
        s.add_argument("--max-seq-length", type=int, default=512)
    m.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    if args.command == "windows":
        write_windows(args.output, args.num_samples, args.max_seq_length)
    elif args.command == "matrix":
        matrix(args)
    elif args.command == "perplexity":
        evaluate(args)
    else:
        cost(args)


if __name__ == "__main__":
    main()
