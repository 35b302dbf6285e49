"""Compress SmolLM2-135M-Instruct on the CPU, then compare sizes and answers with the float model.

    python examples/smollm2_demo.py [--output out/smollm2-w4a16]
"""

import argparse
import warnings
import shutil
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from modelpress import oneshot
from modelpress.runner.cli import preset_recipe
from modelpress.runner.engine.checkpoint import human_bytes
from modelpress.runner.evaluation import answer
from modelpress.runner.smollm2 import smollm2_dir

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one sentence what a CPU does.",
]
# int4 weights with a scale and zero point per 64 inputs (SmolLM2's 576 hidden features rule out 128)
RECIPE = preset_recipe("W4A16_ASYM", group_size=64, observer=None)


def side_by_side(left: str, right: str, width: int = 48) -> str:
    a, b = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"  {x:<{width}} | {y}" for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("out/smollm2-w4a16"))
    args = parser.parse_args()

    source = smollm2_dir()
    shutil.rmtree(args.output, ignore_errors=True)
    result = oneshot(model=source, recipe=RECIPE, output_dir=args.output, device="cpu")

    print(f"\nRTN W4A16 (asymmetric, group 64) of {source}")
    print(f"  size before  {human_bytes(result.input_bytes)}")
    print(f"  size after   {human_bytes(result.output_bytes)}  ({result.ratio:.2f}x smaller)")
    print(f"  time         {result.seconds:.1f} s, {result.quantized_modules} Linears quantized\n")

    warnings.filterwarnings("ignore", message="You passed `quantization_config`")
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    compressed = AutoModelForCausalLM.from_pretrained(
        args.output, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    print(f"  {'original':<48} | compressed")
    for prompt in PROMPTS:
        print(f"\n> {prompt}")
        print(side_by_side(answer(original, tokenizer, prompt), answer(compressed, tokenizer, prompt)))


if __name__ == "__main__":
    main()
