"""Benchmark self-generated calibration: sampled tokens per second against the plain forward floor, as JSON.

    python bench/selfgen_bench.py [--model DIR] [--num-samples 64] [--length 256] [--repeats 1] [--output FILE]

The model defaults to the SmolLM2-135M-Instruct fixture (`modelpress smollm2`). Generation is the
runner's own (`modelpress.runner.sampling.generate`: top-k then top-p, KV cache, batches sized to
the device). The floor is one plain forward of the very samples it wrote, batch by batch, with the
logits at every position: the same numbers generation computes once each, without a cache, a
sampler or a step at a time. `ratio` is generation time over floor time; each is the best of
`--repeats` runs, since a shared machine only ever makes a run slower.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from modelpress.runner import sampling
from modelpress.runner.smollm2 import smollm2_dir


@torch.no_grad()
def floor(model: torch.nn.Module, samples: list[torch.Tensor], per_batch: int) -> None:
    """One forward of every sample, in the batches generation used."""
    ids = torch.cat(samples).to(next(model.parameters()).device)
    for first in range(0, len(ids), per_batch):
        model(input_ids=ids[first : first + per_batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=256, help="tokens per sample, the start token included")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model or smollm2_dir()
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    per_batch = min(args.num_samples, sampling.batch_size(device, model.config, args.length))
    sampling.generate(model, start, 2, 8, args.seed)  # first-call costs (kernels, allocator) out of both timings
    generate_times, floor_times = [], []
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine falls on both alike
        began = time.monotonic()
        samples = sampling.generate(model, start, args.num_samples, args.length, args.seed)
        generate_times.append(time.monotonic() - began)
        began = time.monotonic()
        floor(model, samples, per_batch)
        floor_times.append(time.monotonic() - began)
    generate_s, floor_s = min(generate_times), min(floor_times)
    sampled = args.num_samples * (args.length - 1)
    report = {
        "model": str(model_dir),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "samples": args.num_samples,
        "length": args.length,
        "batch": per_batch,
        "top_k": sampling.TOP_K,
        "top_p": sampling.TOP_P,
        "repeats": args.repeats,
        "generate_s": round(generate_s, 2),
        "generate_tokens_per_s": round(sampled / generate_s, 1),
        "forward_floor_s": round(floor_s, 2),
        "forward_floor_tokens_per_s": round(args.num_samples * args.length / floor_s, 1),
        "ratio": round(generate_s / floor_s, 2),
    }
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
