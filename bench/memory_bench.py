"""The memory preflight against measured peaks: `modelpress run` per setting, estimate vs peak RSS.

    python bench/memory_bench.py [--cases NAME ...] [--work DIR] [--json bench/memory.json] [--markdown bench/memory.md]

Each case is a CompressionJob run by `modelpress run` in a child process. The estimate is the one
the runner prints before any download (the first progress event); the measured peak is the
child's maximum resident set size, from GNU time (`/usr/bin/time -f %M`) when present, else as the
kernel reports it when the child is reaped (wait4), so it covers the whole process: Python, torch,
every stage. This process stays free of torch (the synthetic model is written by a child of its
own): a child's peak counts the pages it shared with its parent before it started the runner. Models: the
SmolLM2-135M-Instruct fixture (float32, tied embeddings) and a synthetic Llama written shard by
shard (bfloat16, untied, a wider MLP), both calibrated on the first half of WikiText-2's
validation text and evaluated on the second half.

The large cases (`synthetic-1.5b-*`, `synthetic-8b-*`: about 6 GB of float32 and 16 GB of
bfloat16) are the models bigger than the pod: each has a bound its peak must stay under, and its
output is spot-checked against round-to-nearest of the source weights (bench/spot_check.py). Their
models are written into the work folder before their first case and deleted after their last, and
each case's output after its check, so one large model is on disk at a time. Cases not run keep
their rows from the JSON file's earlier runs.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# Synthetic Llama shapes (tests/support/synthetic.py writes them); those in LARGE are deleted after their cases.
SYNTHETIC = {
    "synthetic": dict(hidden=1024, intermediate=4096, layers=8, heads=16, kv_heads=4, vocab=49152, dtype="bfloat16"),  # 445 MB
    "synthetic-1.5b": dict(hidden=2048, intermediate=8192, layers=21, heads=32, kv_heads=8, vocab=49152, dtype="float32"),  # 5.9 GB
    # the 1.5b model's layers and vocabulary, 3 of its 21 layers: every stage's peak is the 1.5b's, in a seventh of the time
    "synthetic-1.5b-3": dict(hidden=2048, intermediate=8192, layers=3, heads=32, kv_heads=8, vocab=49152, dtype="float32"),
    "synthetic-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, dtype="bfloat16"),  # 16 GB
}
LARGE = {"synthetic-1.5b", "synthetic-1.5b-3", "synthetic-8b"}
MiB = 1 << 20
GNU_TIME = Path("/usr/bin/time")
PERPLEXITY_TOKENS = 4096  # half the default: a layer-by-layer evaluation of 8192 tokens takes minutes on 2 cores
SHORT_PERPLEXITY = 512  # one window, for the large models


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "smollm2" or "synthetic"
    recipe: dict[str, Any]
    samples: int = 0
    sequence: int = 0
    perplexity: bool = False
    prompts: int = 0
    self_generated: bool = False
    perplexity_tokens: int = PERPLEXITY_TOKENS
    bound_mib: float | None = None  # the peak it must stay under


GPTQ = {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64}
RTN = {"preset": "W4A16", "algorithm": "RTN", "groupSize": 64}
# GPTQ W4A16 g64 aimed at the float model's output: the float stream doubles the kept activations
GPTQ_FLOAT = {"modifiers": {"quant_stage": {"quant_modifiers": {"GPTQModifier": {
    "ignore": ["lm_head"], "float_target": 0.5,
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}}}}}}
CASES = [
    Case("smollm2-rtn", "smollm2", RTN),
    Case("smollm2-rtn-ppl", "smollm2", RTN, perplexity=True),
    Case("smollm2-rtn-answers", "smollm2", RTN, prompts=2),
    Case("smollm2-gptq-32x256", "smollm2", GPTQ, 32, 256),
    Case("smollm2-gptq-32x256-ppl", "smollm2", GPTQ, 32, 256, perplexity=True),
    Case("smollm2-gptq-128x256-ppl", "smollm2", GPTQ, 128, 256, perplexity=True),
    Case("smollm2-gptq-32x512-ppl", "smollm2", GPTQ, 32, 512, perplexity=True),
    Case("smollm2-gptq-128x512-ppl", "smollm2", GPTQ, 128, 512, perplexity=True),
    Case("smollm2-gptq-float-128x512-ppl", "smollm2", GPTQ_FLOAT, 128, 512, perplexity=True),
    Case("smollm2-gptq-selfgen-32x128", "smollm2", GPTQ, 32, 128, self_generated=True),
    Case("synthetic-rtn-ppl", "synthetic", RTN, perplexity=True),
    Case("synthetic-gptq-32x256-ppl", "synthetic", GPTQ, 32, 256, perplexity=True),
    Case("synthetic-gptq-64x256", "synthetic", GPTQ, 64, 256),
    Case("synthetic-1.5b-gptq-16x256-ppl", "synthetic-1.5b", GPTQ, 16, 256, perplexity=True, perplexity_tokens=SHORT_PERPLEXITY,
         bound_mib=2560),
    Case("synthetic-1.5b-3-gptq-16x256-ppl", "synthetic-1.5b-3", GPTQ, 16, 256, perplexity=True, perplexity_tokens=SHORT_PERPLEXITY,
         bound_mib=2560),
    Case("synthetic-1.5b-rtn-ppl", "synthetic-1.5b", RTN, perplexity=True, perplexity_tokens=SHORT_PERPLEXITY, bound_mib=2560),
    Case("synthetic-8b-rtn-ppl", "synthetic-8b", RTN, perplexity=True, perplexity_tokens=SHORT_PERPLEXITY, bound_mib=4096),
]


@dataclass
class Measured:
    case: str
    settings: str
    estimate_mib: float
    estimate_stage: str
    measured_mib: float
    ratio: float  # estimate / measured
    wall_s: float
    exit_code: int
    stages_mib: dict[str, float] = field(default_factory=dict)
    model: str = ""
    bound_mib: float | None = None
    within_bound: bool | None = None
    spot_check: dict[str, Any] | None = None


def settings(case: Case) -> str:
    recipe = f"{case.recipe['algorithm']} W4A16 g64" if "algorithm" in case.recipe else "GPTQ W4A16 g64, float_target 0.5"
    data = f", {case.samples} x {case.sequence}" + (" self-generated" if case.self_generated else "") if case.samples else ""
    tokens = f" ({case.perplexity_tokens} tokens)" if case.perplexity_tokens != PERPLEXITY_TOKENS else ""
    extra = (f", perplexity{tokens}" if case.perplexity else "") + (f", {case.prompts} prompts" if case.prompts else "")
    return recipe + data + extra


def job(case: Case, model_dir: Path, work: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"uri": str(model_dir)}, "recipe": case.recipe,
                            "output": {"uri": str(work / "out"), "overwrite": True}}
    if case.samples:
        dataset = "self-generated" if case.self_generated else str(work / "calibration.txt")
        spec["calibration"] = {"dataset": dataset, "numSamples": case.samples, "maxSequenceLength": case.sequence}
    evaluation: dict[str, Any] = {}
    if case.perplexity:
        evaluation["perplexity"] = {"dataset": str(work / "evaluation.txt"), "maxTokens": case.perplexity_tokens}
    if case.prompts:
        evaluation["prompts"] = ["What is the capital of France?", "Name a prime number."][: case.prompts]
        evaluation["maxNewTokens"] = 16
    if evaluation:
        spec["evaluation"] = evaluation
    return {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": case.name}, "spec": spec}


def run_case(case: Case, model_dir: Path, work: Path) -> Measured:
    """One `modelpress run` in a child process; its estimate from stdout, its peak RSS from wait4."""
    path = work / f"{case.name}.yaml"
    path.write_text(yaml.safe_dump(job(case, model_dir, work)))
    command = [sys.executable, "-m", "modelpress.runner.cli", "run", str(path), "--format", "json",
               "--scratch", str(work / "scratch"), "--termination-log", str(work / "termination-log")]
    peak_file = work / f"{case.name}.peak"
    if GNU_TIME.is_file():
        command = [str(GNU_TIME), "-f", "%M", "-o", str(peak_file), *command]
    start = time.monotonic()
    with open(work / f"{case.name}.out", "w") as out, open(work / f"{case.name}.err", "w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    kilobytes = int(peak_file.read_text().split()[-1]) if GNU_TIME.is_file() else usage.ru_maxrss  # KiB on Linux
    estimate = next((e["memory"] for e in map(json.loads, filter(None, (work / f"{case.name}.out").read_text().splitlines()))
                     if e.get("event") == "progress" and "memory" in e), None)
    if estimate is None:
        raise SystemExit(f"{case.name}: no estimate in the output (exit {child.returncode}); see {work / case.name}.err")
    measured = kilobytes * 1024 / MiB
    return Measured(case.name, settings(case), round(estimate["peakBytes"] / MiB, 1), estimate["peakStage"], round(measured, 1),
                    round(estimate["peakBytes"] / MiB / measured, 3), round(wall, 1), child.returncode,
                    {s["stage"]: round(s["bytes"] / MiB, 1) for s in estimate["stages"]}, case.model, case.bound_mib,
                    measured < case.bound_mib if case.bound_mib else None)


def spot_check(model_dir: Path, out: Path) -> dict[str, Any]:
    """bench/spot_check.py in a child: a few output Linears against RTN of the source weights."""
    found = subprocess.run([sys.executable, str(ROOT / "bench" / "spot_check.py"), str(model_dir), str(out), "64"],
                           check=True, capture_output=True, text=True)
    return json.loads(found.stdout.splitlines()[-1])


def markdown(rows: list[Measured], machine: str) -> str:
    lines = [f"Estimate vs measured peak RSS of `modelpress run` ({machine}).", "",
             "| case | settings | estimate (MiB) | at stage | measured (MiB) | estimate / measured | bound (MiB) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.case} | {r.settings} | {r.estimate_mib:.0f} | {r.estimate_stage} | {r.measured_mib:.0f} | {r.ratio:.2f} | "
              f"{f'{r.bound_mib:.0f}' if r.bound_mib else ''} | {r.wall_s:.0f} |" for r in rows]
    worst = max(rows, key=lambda r: abs(r.ratio - 1))
    lines += ["", f"Largest deviation: {100 * (worst.ratio - 1):+.1f}% ({worst.case})."]
    return "\n".join(lines) + "\n"


def model_dir(name: str, work: Path) -> Path:
    """The model of that name: the SmolLM2 fixture, or a synthetic one written by a child (unless already there)."""
    from modelpress.runner.smollm2 import smollm2_dir

    if name == "smollm2":
        return smollm2_dir()
    out = work / name
    shape = dict(SYNTHETIC[name])
    dtype = shape.pop("dtype")
    if (out / "config.json").is_file():
        return out
    write = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
             "from support.synthetic import llama_config, write_synthetic_llama; "
             f"write_synthetic_llama(Path(sys.argv[2]), llama_config(**{shape!r}, dtype=torch.{dtype}), Path(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", write, str(ROOT / "tests"), str(out), str(smollm2_dir())], check=True)
    return out


def previous_rows(path: Path) -> dict[str, Measured]:
    """The rows of an earlier run's JSON, by case."""
    if not path.is_file():
        return {}
    known = set(Measured.__dataclass_fields__)
    return {c["case"]: Measured(**{k: v for k, v in c.items() if k in known}) for c in json.loads(path.read_text())["cases"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "memory.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "memory.md")
    parser.add_argument("--work", type=Path, default=None, help="where models, jobs and outputs go (default: a temporary folder)")
    parser.add_argument("--keep-models", action="store_true", help="keep the large models for another run (delete them yourself)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="modelpress-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    text = WIKITEXT.read_text(encoding="utf-8")
    (work / "calibration.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    (work / "evaluation.txt").write_text(text[len(text) // 2 :], encoding="utf-8")
    cases = [c for c in CASES if c.name in args.cases]
    first_use = [c.model for c in cases]
    cases.sort(key=lambda c: first_use.index(c.model))  # a model's cases together, so it is written once
    measured = previous_rows(args.json)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    for i, case in enumerate(cases):
        model = model_dir(case.model, work)
        row = run_case(case, model, work)
        if case.model in LARGE and row.exit_code == 0:
            row.spot_check = spot_check(model, work / "out")
        print(json.dumps(asdict(row)), flush=True)
        measured[case.name] = row
        rows = [measured[c.name] for c in CASES if c.name in measured]
        args.json.write_text(json.dumps({"machine": machine, "cases": [asdict(r) for r in rows]}, indent=2) + "\n")
        args.markdown.write_text(markdown(rows, machine))  # after every case: a long run's rows survive its interruption
        if case.model in LARGE:
            shutil.rmtree(work / "out", ignore_errors=True)
            if not args.keep_models and all(c.model != case.model for c in cases[i + 1 :]):
                shutil.rmtree(model)
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
