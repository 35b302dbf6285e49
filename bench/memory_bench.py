"""The memory preflight against measured peaks: `modelpress run` per setting, estimate vs peak RSS.

    python bench/memory_bench.py [--cases NAME ...] [--json bench/memory.json] [--markdown bench/memory.md]

Each case is a CompressionJob run by `modelpress run` in a child process. The estimate is the one
the runner prints before any download (the first progress event); the measured peak is the
child's maximum resident set size, from GNU time (`/usr/bin/time -f %M`) when present, else as the
kernel reports it when the child is reaped (wait4), so it covers the whole process: Python, torch,
every stage. This process stays free of torch (the synthetic model is written by a child of its
own): a child's peak counts the pages it shared with its parent before it started the runner. Models: the
SmolLM2-135M-Instruct fixture (float32, tied embeddings) and a synthetic Llama written shard by
shard (bfloat16, untied, a wider MLP), both calibrated on the first half of WikiText-2's
validation text and evaluated on the second half.
"""

import argparse
import json
import os
import platform
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
SYNTHETIC = dict(hidden=1024, intermediate=4096, layers=8, heads=16, kv_heads=4, vocab=49152)  # 445 MB of bfloat16
MiB = 1 << 20
GNU_TIME = Path("/usr/bin/time")
PERPLEXITY_TOKENS = 4096  # half the default: a layer-by-layer evaluation of 8192 tokens takes minutes on 2 cores


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


GPTQ = {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64}
RTN = {"preset": "W4A16", "algorithm": "RTN", "groupSize": 64}
CASES = [
    Case("smollm2-rtn", "smollm2", RTN),
    Case("smollm2-rtn-ppl", "smollm2", RTN, perplexity=True),
    Case("smollm2-rtn-answers", "smollm2", RTN, prompts=2),
    Case("smollm2-gptq-32x256", "smollm2", GPTQ, 32, 256),
    Case("smollm2-gptq-32x256-ppl", "smollm2", GPTQ, 32, 256, perplexity=True),
    Case("smollm2-gptq-128x256-ppl", "smollm2", GPTQ, 128, 256, perplexity=True),
    Case("smollm2-gptq-32x512-ppl", "smollm2", GPTQ, 32, 512, perplexity=True),
    Case("smollm2-gptq-128x512-ppl", "smollm2", GPTQ, 128, 512, perplexity=True),
    Case("smollm2-gptq-selfgen-32x128", "smollm2", GPTQ, 32, 128, self_generated=True),
    Case("synthetic-rtn-ppl", "synthetic", RTN, perplexity=True),
    Case("synthetic-gptq-32x256-ppl", "synthetic", GPTQ, 32, 256, perplexity=True),
    Case("synthetic-gptq-64x256", "synthetic", GPTQ, 64, 256),
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


def settings(case: Case) -> str:
    recipe = f"{case.recipe['algorithm']} W4A16 g64"
    data = f", {case.samples} x {case.sequence}" + (" self-generated" if case.self_generated else "") if case.samples else ""
    extra = (", perplexity" if case.perplexity else "") + (f", {case.prompts} prompts" if case.prompts else "")
    return recipe + data + extra


def job(case: Case, model_dir: Path, work: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"uri": str(model_dir)}, "recipe": case.recipe,
                            "output": {"uri": str(work / "out"), "overwrite": True}}
    if case.samples:
        dataset = "self-generated" if case.self_generated else str(work / "calibration.txt")
        spec["calibration"] = {"dataset": dataset, "numSamples": case.samples, "maxSequenceLength": case.sequence}
    evaluation: dict[str, Any] = {}
    if case.perplexity:
        evaluation["perplexity"] = {"dataset": str(work / "evaluation.txt"), "maxTokens": PERPLEXITY_TOKENS}
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
                    {s["stage"]: round(s["bytes"] / MiB, 1) for s in estimate["stages"]})


def markdown(rows: list[Measured], machine: str) -> str:
    lines = [f"Estimate vs measured peak RSS of `modelpress run` ({machine}).", "",
             "| case | settings | estimate (MiB) | at stage | measured (MiB) | estimate / measured |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.case} | {r.settings} | {r.estimate_mib:.0f} | {r.estimate_stage} | {r.measured_mib:.0f} | {r.ratio:.2f} |"
              for r in rows]
    worst = max(rows, key=lambda r: abs(r.ratio - 1))
    lines += ["", f"Largest deviation: {100 * (worst.ratio - 1):+.1f}% ({worst.case})."]
    return "\n".join(lines) + "\n"


def models(work: Path, wanted: set[str]) -> dict[str, Path]:
    from modelpress.runner.smollm2 import smollm2_dir

    found = {"smollm2": smollm2_dir()}
    if "synthetic" in wanted:
        found["synthetic"] = work / "synthetic"
        write = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                 "from support.synthetic import llama_config, write_synthetic_llama; "
                 f"write_synthetic_llama(Path(sys.argv[2]), llama_config(**{SYNTHETIC!r}, dtype=torch.bfloat16), Path(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", write, str(ROOT / "tests"), str(found["synthetic"]), str(found["smollm2"])], check=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "memory.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "bench" / "memory.md")
    parser.add_argument("--work", type=Path, default=None, help="where models, jobs and outputs go (default: a temporary folder)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="modelpress-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    text = WIKITEXT.read_text(encoding="utf-8")
    (work / "calibration.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    (work / "evaluation.txt").write_text(text[len(text) // 2 :], encoding="utf-8")
    cases = [c for c in CASES if c.name in args.cases]
    dirs = models(work, {c.model for c in cases})
    rows = []
    for case in cases:
        row = run_case(case, dirs[case.model], work)
        print(json.dumps(asdict(row)), flush=True)
        rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    args.json.write_text(json.dumps({"machine": machine, "cases": [asdict(r) for r in rows]}, indent=2) + "\n")
    args.markdown.write_text(markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
