"""The W4A16 quality matrix: each recipe's perplexity as a multiple of float, ModelPress beside its peers on the same windows.

    python bench/quality_bench.py [--priority a b c] [--cells NAME ...] [--compare-llmcompressor VENV]
        [--num-samples 32] [--max-seq-length 512] [--json bench/quality.json] [--markdown bench/quality.md]
    python bench/quality_bench.py --render      # the Markdown table of an earlier (or partial) JSON

Cells: RTN, GPTQ, AWQ, AWQ + GPTQ and SpinQuant R1/R2 Hadamard(64) + GPTQ, each symmetric and
asymmetric, in groups of 64, of 128 and per output channel, with the `minmax` and `imatrix_mse`
observers on the GPTQ cells. Each cell is one YAML file in bench/recipes/ that every peer reads as
it is (a peer mapped to None there has no equivalent and is not run). A group size that does not
divide a Linear's input features is not run on that model, and the table says why. Priorities
(`--priority`) order the cells so that a run cut short keeps the ones that matter: a) the g64
cells the issue compares, b) per channel, c) the rest.

The runner is bench/compare_bench.py's: one process per side, one after the other, the same
calibration windows from the first half of the text, perplexity of every output on the second
half by the same code. The JSON is rewritten after every cell.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_bench import (  # noqa: E402
    draws_phrase,
    BENCH,
    OURS,
    RECIPES,
    WIKITEXT,
    ChildFailed,
    Recipe,
    Settings,
    memory_bench,
    run_matrix,
    venv_peer,
)

LLMC = "llmcompressor"
GPTQMODEL = "gptqmodel"  # the third peer: GPTQ with min-max scales, no rotations, no importance-weighted search; its AWQ always clips
PEER_LABELS = {OURS: "ModelPress", LLMC: "llm-compressor 0.14", GPTQMODEL: "GPTQModel"}
GROUPINGS = {"g64": "group 64", "g128": "group 128", "ch": "per channel"}
METHODS = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "awq_gptq": "AWQ + GPTQ",
    "spinquant_hadamard_gptq": "SpinQuant R1/R2 Hadamard(64) + GPTQ",
}
OBSERVED = ("gptq", "spinquant_hadamard_gptq")  # the methods run with each observer
# observer -> the recipe file's suffix; imatrix_mse+ends: ModelPress's `separate_ends` search (no
# peer has it), and +float: GPTQ's `float_target` 0.5, aimed at the float model's output (GPTQModel's
# GPTAQ with the same alpha is its equal, llm-compressor has none)
OBSERVERS = {
    "minmax": "",
    "minmax+float": "float",
    "imatrix_mse": "imatrix",
    "imatrix_mse+ends": "imatrix_ends",
    "imatrix_mse+float": "imatrix_float",
}
FIRST = [  # priority a, in this order: (method, symmetric, observer) at group 64
    ("spinquant_hadamard_gptq", False, "imatrix_mse"),
    ("spinquant_hadamard_gptq", False, "imatrix_mse+float"),
    ("spinquant_hadamard_gptq", False, "imatrix_mse+ends"),
    ("gptq", False, "imatrix_mse+float"),
    ("gptq", False, "minmax"),
    ("gptq", False, "imatrix_mse"),
    ("gptq", True, "minmax"),
    ("gptq", True, "imatrix_mse"),
    ("awq", False, "minmax"),
    ("rtn", False, "minmax"),
    ("rtn", True, "minmax"),
]


@dataclass(frozen=True)
class Cell:
    """One recipe of the matrix, by the axes the table is read along."""

    method: str
    symmetric: bool
    grouping: str
    observer: str

    @property
    def stem(self) -> str:
        """The recipe's file name in bench/recipes/, without .yaml."""
        scheme = ("sym" if self.symmetric else "asym") if self.method.startswith("spinquant") else ("" if self.symmetric else "asym")
        parts = [self.method, "w4a16", scheme, self.grouping, OBSERVERS[self.observer]]
        return "_".join(p for p in parts if p)

    @property
    def name(self) -> str:
        return self.stem.replace("_", "-")

    @property
    def label(self) -> str:
        return f"{METHODS[self.method]}, {'sym' if self.symmetric else 'asym'}, {GROUPINGS[self.grouping]}, {self.observer}"

    @property
    def priority(self) -> str:
        if self.grouping == "ch":
            return "b"
        return "a" if self.grouping == "g64" and (self.method, self.symmetric, self.observer) in FIRST else "c"

    def recipe(self) -> Recipe:
        """The compare_bench recipe; a peer without this method or observer is mapped to None."""
        observer, _, variant = self.observer.partition("+")
        gptqmodel_has = self.method == "gptq" and observer == "minmax" and variant in ("", "float")
        peers: dict[str, Path | None] = {} if gptqmodel_has else {GPTQMODEL: None}
        if variant:
            peers[LLMC] = None
        return Recipe(self.name, self.label, RECIPES / f"{self.stem}.yaml", peers=peers)


def _cells() -> list[Cell]:
    """Every cell, in the order of the issue's priorities (a before b before c), then as listed."""
    cells = [
        Cell(method, symmetric, grouping, observer)
        for grouping in ("g64", "ch", "g128")
        for symmetric in (False, True)
        for method in METHODS
        for observer in (("minmax", "imatrix_mse") if method in OBSERVED else ("minmax",))
        if grouping != "g128" or (method in ("rtn", "gptq") and observer == "minmax")
    ]
    cells.append(Cell("spinquant_hadamard_gptq", False, "g64", "imatrix_mse+ends"))
    cells += [Cell(method, False, "g64", "imatrix_mse+float") for method in OBSERVED]
    # and where plain GPTQ trails llm-compressor at 32 windows: symmetric g64, per channel
    cells += [Cell("gptq", False, "g64", "minmax+float"), Cell("gptq", True, "g64", "minmax+float"),
              Cell("gptq", True, "g64", "imatrix_mse+float"), Cell("gptq", False, "ch", "minmax+float"),
              Cell("gptq", False, "ch", "imatrix_mse+float"), Cell("gptq", True, "ch", "imatrix_mse+float")]

    def order(c: Cell) -> tuple[str, int]:
        key = (c.method, c.symmetric, c.observer)
        return c.priority, FIRST.index(key) if c.priority == "a" else len(FIRST)

    return sorted(cells, key=order)


CELLS = _cells()


def group_size(recipe: Path) -> int | None:
    """The group size a recipe's quantizers use (None: per channel)."""
    stages = yaml.safe_load(recipe.read_text())
    sizes = {weights.get("group_size")
             for stage in stages.values() for modifiers in stage.values() for modifier in modifiers.values()
             for group in ((modifier or {}).get("config_groups") or {}).values()
             for weights in [group.get("weights") or {}]}
    return max((s for s in sizes if s), default=None)


def input_widths(model: Path) -> dict[str, int]:
    """The input features of a Llama-style decoder's Linears, from config.json."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"] * config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return {"hidden_size": config["hidden_size"], "num_attention_heads x head_dim": heads,
            "intermediate_size": config["intermediate_size"]}


def shape_refusal(cell: Cell, model: Path) -> str | None:
    """Why a cell cannot run on this model (a group size that does not tile an input width), else None."""
    size = group_size(RECIPES / f"{cell.stem}.yaml")
    bad = [f"{name} {width}" for name, width in input_widths(model).items() if size and width % size]
    return f"group {size} does not divide {', '.join(bad)}" if bad else None


def float_multiples(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each case's perplexity per side as a multiple of its model's float perplexity."""
    rows = []
    for case in report["cases"]:
        floats = report["models"][case["model"]]["float_perplexity"]
        rows.append({"model": case["model"], "recipe": case["recipe"], "label": case["label"],
                     "x_float": {side: round(s["perplexity"] / floats, 4) if s["perplexity"] and floats else None
                                 for side, s in case["sides"].items()}})
    return rows


def _x(value: float | None) -> str:
    return f"{value:.3f}×" if value is not None else "—"


def markdown(report: dict[str, Any]) -> str:
    """The table: per cell each side's perplexity and its multiple of float, and the best per side."""
    settings = report["settings"]
    sides = [OURS, *report["peers"]]
    lines = [f"{report['machine']}; calibration **{settings['num_samples']} × {settings['max_seq_length']} tokens** from span "
             f"{settings['calibration_span']} of `{Path(settings['text']).name}`, perplexity on span "
             f"{settings['evaluation_span']} ({settings['perplexity_tokens'] or 'all'} tokens), never calibrated on; one run "
             f"per side, one process at a time{draws_phrase(settings)}.", ""]
    floats = [f"{name} {m['float_perplexity']:.2f}" for name, m in report["models"].items() if m["float_perplexity"] is not None]
    if floats:
        lines += ["Float perplexity (1.000×): " + ", ".join(floats) + ".", ""]
    head = " | ".join(f"{PEER_LABELS.get(s, s)}: perplexity, × float, wall" for s in sides)
    head += "".join(f" | ModelPress ÷ {PEER_LABELS.get(p, p)}" for p in report["peers"])
    lines += [f"| model | recipe | {head} |", "|---|---|" + "---|" * (2 * len(sides) - 1)]
    best: dict[str, tuple[float, str]] = {}
    by_case = {(r["model"], r["recipe"]): r["x_float"] for r in float_multiples(report)}
    for case in report["cases"]:
        cells = []
        for side in sides:
            got = case["sides"].get(side)
            if got is None:
                cells.append("no equivalent" if side != OURS else "—")
                continue
            if got["wall_s"] is None:
                cells.append(f"failed: {got['runs'][-1]['error']}")
                continue
            x = by_case[(case["model"], case["recipe"])].get(side)
            ppl = f"{got['perplexity']:.2f}" if got["perplexity"] is not None else "—"
            if got.get("perplexities") and None not in got["perplexities"]:
                ppl += " (" + " / ".join(f"{v:.2f}" for v in got["perplexities"]) + ")"
            cells.append(f"{ppl}, **{_x(x)}**, {got['wall_s']:.0f} s")
            if x is not None and "g64" in case["recipe"] and (side not in best or x < best[side][0]):
                best[side] = (x, case["label"])
        cells += [_x(case["ratios"].get(p, {}).get("perplexity")) for p in report["peers"]]
        lines.append(f"| {case['model']} | {case['label']} | " + " | ".join(cells) + " |")
    for skipped in report.get("skipped", []):
        lines.append(f"| {skipped['model']} | {skipped['label']} | not run: {skipped['reason']} |" + " |" * (2 * len(sides) - 2))
    lines.append("")
    lines += [f"Best W4A16 g64, {PEER_LABELS.get(side, side)}: **{_x(x)}** ({label})." for side, (x, label) in best.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "synthetic"])
    parser.add_argument("--priority", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--cells", nargs="+", default=None, choices=[c.name for c in CELLS], help="these cells only")
    parser.add_argument("--compare-llmcompressor", type=Path, metavar="VENV", help="llm-compressor's venv (its bin/python runs the peer)")
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--perplexity-tokens", type=int, default=8192, help="0: the whole evaluation span")
    parser.add_argument("--draws", type=int, default=1, help="disjoint sets of --num-samples windows; perplexity is their mean")
    parser.add_argument("--work", type=Path, default=None, help="models, windows, outputs and logs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=BENCH / "quality.json")
    parser.add_argument("--markdown", type=Path, default=BENCH / "quality.md")
    parser.add_argument("--render", action="store_true", help="run nothing: write the Markdown table of the --json report")
    args = parser.parse_args()

    if args.render:
        args.markdown.write_text(markdown(json.loads(args.json.read_text())))
        print(args.markdown.read_text())
        return
    if not args.text.is_file():
        raise SystemExit(f"--text: {args.text} is not a file; give the calibration and evaluation text")
    if args.num_samples < 1 or args.draws < 1 or args.max_seq_length < 2:
        raise SystemExit("--num-samples, --draws: at least 1; --max-seq-length: at least 2")
    peers = [venv_peer("--compare-llmcompressor", args.compare_llmcompressor, LLMC, "llm-compressor")] if args.compare_llmcompressor else []
    settings = Settings(args.text, "0:0.5", "0.5:1", args.num_samples, args.max_seq_length, args.perplexity_tokens, 1, True, args.draws)
    work = args.work or Path(tempfile.mkdtemp(prefix="modelpress-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in CELLS if (c.name in args.cells if args.cells else c.priority in args.priority)]

    report: dict[str, Any] = {"cases": [], "models": {}, "skipped": []}
    for name in args.models:
        model = memory_bench.model_dir(name, work)
        runnable = [c for c in chosen if shape_refusal(c, model) is None]
        skipped = [{"model": name, "recipe": c.name, "label": c.label, "reason": shape_refusal(c, model)}
                   for c in chosen if c not in runnable]
        try:
            part = run_matrix([name], [c.recipe() for c in runnable], peers, settings, work / name, args.json)
        except ChildFailed as err:
            raise SystemExit(str(err)) from None
        report = {**part, "cases": report["cases"] + part["cases"], "models": {**report["models"], **part["models"]},
                  "skipped": report["skipped"] + skipped}
    report["x_float"] = float_multiples(report)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
