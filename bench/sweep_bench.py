"""Benchmark GPTQ's column sweep on one thread against the sweep split over SWEEP_THREADS threads
by output rows, on SmolLM2-135M's four weight stacks per layer (random weights and inputs), as JSON.

    python bench/sweep_bench.py [--repeats 3] [--tokens 8192] [--output out/bench-sweep.json]

Both are timed in turns in the same process (the machine may be shared: `ratio`, the threaded
time over the one-thread time per turn, is what compares; the spread of the turns shows the
noise), and their codes and losses are checked equal bit for bit.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs

from modelpress.engine import second_order
from modelpress.engine.gptq import gptq

STACKS = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536)}  # (rows, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--output", type=Path, default=Path("out/bench-sweep.json"))
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    cases = []
    for rows, cols in STACKS.values():
        x = torch.randn(args.tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
        cases.append((torch.randn(rows, cols, generator=g), 2 * x.T @ x / args.tokens))
    quant = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=64)
    threads = second_order.SWEEP_THREADS
    turns = []
    for _ in range(args.repeats):
        seconds = {}
        results = {}
        for n in (1, threads):
            second_order.SWEEP_THREADS = n
            start = time.perf_counter()
            results[n] = [gptq(w, h, quant) for w, h in cases]
            seconds[n] = time.perf_counter() - start
        assert all(torch.equal(a.q, b.q) and torch.equal(a.row_loss, b.row_loss) for a, b in zip(results[1], results[threads]))
        turns.append({"one_thread_s": round(seconds[1], 3), "threaded_s": round(seconds[threads], 3),
                      "ratio": round(seconds[threads] / seconds[1], 3)})
    second_order.SWEEP_THREADS = threads
    report = {"stacks": STACKS, "scheme": "W4A16 g64, static activation order", "torch_threads": torch.get_num_threads(),
              "sweep_threads": threads, "identical": True, "turns": turns,
              "median_ratio": round(statistics.median(t["ratio"] for t in turns), 3)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
