"""Rotations against none: perplexity of W4A16 g64 recipes on SmolLM2 with and without SpinQuant R1/R2.

    python bench/rotation_bench.py [--only NAME ...] [--output bench/rotations.json]

Each recipe runs through bench/oneshot_bench.py in its own process (calibration: 128 x 512 tokens
from the first half of WikiText-2 validation; perplexity on the second half), and the JSON lines
are gathered into one file, with each perplexity as a multiple of the float model's.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = [  # name -> recipe file in bench/recipes
    "rtn_w4a16_g64",
    "rtn_w4a16_asym_g64",
    "gptq_w4a16_g64",
    "gptq_w4a16_asym_g64",
    *(f"spinquant_{t}_{q}_w4a16_{s}_g64" for q in ("rtn", "gptq") for s in ("sym", "asym") for t in ("hadamard", "learned")),
    "spinquant_hadamard_gptq_w4a16_asym_g64_imatrix",
    "spinquant_hadamard_gptq_w4a16_asym_g64_imatrix_ends",
]


def run(name: str, scratch: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "oneshot_bench.py"), "--recipe", str(HERE / "recipes" / f"{name}.yaml"),
         "--perplexity", "--output", str(scratch / name)],
        check=True, capture_output=True, text=True,
    ).stdout
    report = json.loads(out[out.index("{"):])
    ppl = report["perplexity"]
    return {"recipe": name, "perplexity": ppl["compressed"], "float": ppl["float"],
            "vs_float": round(ppl["compressed"] / ppl["float"], 4), "wall_s": report["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="recipe names (default: all)")
    parser.add_argument("--output", type=Path, default=HERE / "rotations.json")
    parser.add_argument("--scratch", type=Path, default=Path("out/rotation-bench"))
    args = parser.parse_args()
    rows = json.loads(args.output.read_text()) if args.output.is_file() else []
    for name in args.only or RECIPES:
        row = run(name, args.scratch)
        rows = [r for r in rows if r["recipe"] != name] + [row]
        args.output.write_text(json.dumps(rows, indent=2) + "\n")  # kept after every recipe
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
