"""Benchmark where calibration activations are kept: the same compression with them in memory,
in bfloat16 and spilled to disk, each in a process of its own, as JSON.

    python bench/activations_bench.py [--recipe FILE.yaml] [--num-samples 32] [--max-seq-length 512]
                                      [--storages memory,bfloat16,disk] [--output out/bench-activations.json]

Each run is `oneshot_bench.py --activation-storage KIND` (wall time, and peak RSS of the process
when compression ends). `vs_memory` gives each storage's wall time and peak RSS above the runtime
over the in-memory run's (the machine may be shared: run it twice to see the noise), whether its
shards are byte for byte the in-memory run's, and the change of the compressed model's perplexity
on the held-out half of WikiText-2 (the first `--perplexity-tokens`, layer by layer).
"""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from oneshot_bench import WIKITEXT  # noqa: E402


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def run(storage: str, args: argparse.Namespace, out: Path) -> dict:
    spill = out.parent / f"spill-{storage}"
    command = [sys.executable, str(HERE / "oneshot_bench.py"), "--recipe", args.recipe, "--num-samples", str(args.num_samples),
               "--max-seq-length", str(args.max_seq_length), "--activation-storage", storage, "--output", str(out),
               "--spill-dir", str(spill)]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    report["spill_files_left"] = sum(1 for p in spill.rglob("*") if p.is_file()) if spill.exists() else 0
    return report


def perplexity(model_dir: Path, tokens: int) -> float:
    from transformers import AutoTokenizer

    from modelpress.engine.streamed_eval import streamed_perplexity
    from modelpress.runner.evaluation import text_slice

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text_slice(WIKITEXT, 0.5), return_tensors="pt")["input_ids"][0][:tokens]
    return streamed_perplexity(model_dir, ids, 512, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(HERE / "recipes" / "smoothquant_rtn_w8a8.yaml"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--perplexity-tokens", type=int, default=8192)
    parser.add_argument("--storages", default="memory,bfloat16,disk")
    parser.add_argument("--work", type=Path, default=Path("out/bench-activations"))
    parser.add_argument("--output", type=Path, default=Path("out/bench-activations.json"))
    args = parser.parse_args()

    runs: dict[str, dict] = {}
    digests: dict[str, dict[str, str]] = {}
    for storage in args.storages.split(","):
        out = args.work / storage
        report = run(storage, args, out)
        runs[storage] = {k: report[k] for k in ("wall_s", "peak_rss_mib", "rss_before_mib", "spill_files_left")}
        digests[storage] = shards(out)
    # after every run: Linux keeps a process's peak RSS across exec, so a child started after this
    # process had evaluated would report this process's peak as its own
    for storage, r in runs.items():
        same = storage != "memory" and "memory" in digests and digests[storage] == digests["memory"]
        if not same:  # a checkpoint identical to memory's measures the same
            r["perplexity"] = round(perplexity(args.work / storage, args.perplexity_tokens), 4)
    base = runs.get("memory")
    for storage, r in runs.items():
        if base is None or storage == "memory":
            continue
        same = digests[storage] == digests["memory"]
        r["vs_memory"] = {
            "wall": round(r["wall_s"] / base["wall_s"], 3),
            "peak_rss_above_runtime": round((r["peak_rss_mib"] - r["rss_before_mib"]) / (base["peak_rss_mib"] - base["rss_before_mib"]), 3),
            "same_checkpoint": same,
            "perplexity_change_pct": 0.0 if same else round(100 * (r["perplexity"] / base["perplexity"] - 1), 3),
        }
    result = {"recipe": Path(args.recipe).name, "calibration": f"{args.num_samples} x {args.max_seq_length} tokens",
              "threads": torch.get_num_threads(), "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
