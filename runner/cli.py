"""`modelpress` command line: compress a model on this machine, or write the SmolLM2 fixture."""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from modelpress.runner.engine.errors import ModelPressError

PRESET_IGNORE = ["lm_head"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Compress LLMs into vLLM-ready checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model with a recipe or a preset scheme")
    compress.add_argument("--model", required=True, help="model directory or hub id (org/name)")
    compress.add_argument("--recipe", required=True, help="recipe YAML file, or a preset scheme such as W4A16")
    compress.add_argument("--output", required=True, type=Path, help="directory to write the checkpoint to")
    compress.add_argument("--dataset", help="calibration data: a .txt or .jsonl file")
    compress.add_argument("--group-size", type=int, help="group size for a grouped preset (e.g. 64)")
    compress.add_argument("--observer", choices=["minmax", "mse"], help="weight observer for a preset")
    compress.add_argument("--num-samples", type=int, default=512, help="calibration samples (default 512)")
    compress.add_argument("--max-seq-length", type=int, default=2048, help="tokens per sample (default 2048)")
    compress.add_argument("--device", help="cpu or cuda (default: cuda when present)")

    commands.add_parser("smollm2", help="write SmolLM2-135M-Instruct as a float model directory; print its path")
    return parser


def preset_recipe(preset: str, group_size: int | None, observer: str | None) -> Any:
    """A preset name as a recipe: quantize every Linear but the head, like llm-compressor's examples."""
    from modelpress.runner.engine.modifiers import QuantizationModifier
    from modelpress.runner.engine.schemes import resolve_scheme

    extra = {"weight_observer": observer} if observer else {}
    if group_size is None:
        return QuantizationModifier(scheme=preset, ignore=PRESET_IGNORE, **extra)
    scheme = resolve_scheme(preset, ["Linear"])["group_0"]
    if scheme.weights is None or scheme.weights.group_size is None or scheme.weights.group_size <= 0:
        raise ModelPressError(f"--group-size: preset {preset} is not grouped; drop the flag")
    weights = scheme.weights.model_copy(update={"group_size": group_size})
    body = scheme.model_copy(update={"weights": weights}).model_dump(mode="json", exclude_none=True)
    return QuantizationModifier(config_groups={"group_0": body}, ignore=PRESET_IGNORE, **extra)


def recipe_argument(recipe: str, group_size: int | None, observer: str | None) -> Any:
    """`--recipe`: a YAML file (used as it is), or a preset refined by --group-size/--observer."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if group_size or observer:
            raise ModelPressError("--group-size/--observer: only apply to a preset; set them in the recipe file")
        return path
    return preset_recipe(recipe, group_size, observer)


def compress(args: argparse.Namespace) -> None:
    from modelpress.runner.engine.checkpoint import human_bytes
    from modelpress.runner.engine.oneshot import oneshot

    recipe = recipe_argument(args.recipe, args.group_size, args.observer)
    result = oneshot(
        model=args.model,
        dataset=args.dataset,
        recipe=recipe,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.max_seq_length,
        output_dir=args.output,
        device=args.device,
        progress=_progress_bar() if sys.stderr.isatty() else None,
    )
    rows = [
        ("model", str(args.model)),
        ("recipe", str(args.recipe)),
        ("output", str(result.output_dir)),
        ("quantized Linears", str(result.quantized_modules)),
        ("size before", human_bytes(result.input_bytes)),
        ("size after", human_bytes(result.output_bytes)),
        ("ratio", f"{result.ratio:.2f}x"),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _progress_bar():
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(event: dict[str, Any]) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=event["layers"], desc=event["stage"], unit="layer")
        bar["bar"].update(event["layer"] - bar["bar"].n)
        if event["layer"] == event["layers"]:
            bar["bar"].close()

    return update


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "compress":
            compress(args)
        else:
            from modelpress.runner.smollm2 import smollm2_dir

            print(smollm2_dir())
    except ModelPressError as err:
        print(f"modelpress: error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
