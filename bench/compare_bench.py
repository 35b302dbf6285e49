"""ModelPress side by side with peer engines on the same inputs: wall time, peak RSS and perplexity, as JSON and Markdown.

    python bench/compare_bench.py [--models smollm2 synthetic] [--recipes gptq-w4a16-g64 ...]
        [--compare-llmcompressor .venv-llmc] [--compare-gptqmodel .venv-gptqmodel] [--repeats 2]
        [--json FILE] [--markdown FILE]

For each model and recipe, each side runs `oneshot` in a process of its own (ModelPress in this
venv through bench/peers/modelpress_run.py, llm-compressor and GPTQModel each in its own venv through
bench/peers/llmcompressor_run.py and bench/peers/gptqmodel_run.py), one after the other, never at
once, `--repeats` times in turn. All read the same model directory and the same calibration windows, written once to a file by
bench/held_out.py from the calibration span of `--text`. A process is measured whole: wall time
from start to exit, CPU time and peak RSS from GNU time (`/usr/bin/time -v`; wait4's rusage when
it is missing), and the machine's load average sampled while it runs. Each output's perplexity on
the evaluation span (never calibrated on) is measured afterwards by the same code, ours. The
ratios are ModelPress / peer, per peer: below 1 is faster, smaller or closer to float. A recipe a
peer has no equivalent for (Recipe.peers maps it to None) is not run on that side.

This process imports no torch; models, windows and perplexities are made by children. Other benches
(a quality matrix of more recipes, another peer) import `Recipe`, `Peer`, `Settings` and
`run_matrix` from here.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RECIPES = BENCH / "recipes"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
GNU_TIME = Path("/usr/bin/time")
MiB = 1 << 20

sys.path.insert(0, str(BENCH))
from held_out import parse_span  # noqa: E402  (torch-free)
import memory_bench  # noqa: E402  (its synthetic shape and writer, one definition)


@dataclass(frozen=True)
class Recipe:
    """One recipe of the matrix: our YAML and, per peer, the equivalent one (the same file unless named)."""

    name: str
    label: str
    ours: Path
    peers: dict[str, Path | None] = field(default_factory=dict)  # a peer mapped to None has no equivalent
    target: tuple[float, float] | None = None  # (wall, peak RSS) ratios to stay under, against llm-compressor

    def for_peer(self, peer: str) -> Path | None:
        return self.peers.get(peer, self.ours)


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    python: Path
    driver: Path


def venv_peer(option: str, venv: Path, name: str, label: str) -> Peer:
    """The peer `name` run by its driver bench/peers/{name}_run.py with the python of `venv`
    (given as `option`), refused with the fix when that venv has none."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{option}: {python} is missing; give the venv {label} is installed in")
    return Peer(name, label, python, BENCH / "peers" / f"{name}_run.py")


@dataclass(frozen=True)
class Settings:
    text: Path
    calibration_span: str
    evaluation_span: str
    num_samples: int
    max_seq_length: int
    perplexity_tokens: int
    repeats: int
    perplexity: bool
    # disjoint sets of calibration windows, each run and measured on its own; perplexity is their mean.
    # One run's perplexity moves by a percent or two with any change to the arithmetic (GPTQ's
    # roundings cascade through the layers), more than most differences between recipes
    draws: int = 1


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    exit_code: int
    load: float  # mean 1-minute load average while it ran (it counts this run's own threads)
    oneshot_s: float | None = None
    error: str | None = None


# GPTQModel runs a lone GPTQModifier, or AWQ with clipping (bench/peers/gptqmodel_run.py); llm-compressor has no group-aware order.
NO_GPTQMODEL: dict[str, Path | None] = {"gptqmodel": None}
NO_LLMC: dict[str, Path | None] = {"llmcompressor": None}
MATRIX = [
    Recipe("rtn-w4a16-g64", "RTN W4A16 g64", RECIPES / "rtn_w4a16_g64.yaml", NO_GPTQMODEL),
    Recipe("gptq-w4a16-g64", "GPTQ W4A16 g64", RECIPES / "gptq_w4a16_g64.yaml", target=(0.4, 0.6)),
    Recipe("gptq-w4a16-asym-g64", "GPTQ W4A16 asym g64", RECIPES / "gptq_w4a16_asym_g64.yaml"),
    Recipe("gptq-w4a16-ch", "GPTQ W4A16 per channel", RECIPES / "gptq_w4a16_ch.yaml"),
    Recipe("gptq-w4a16-asym-ch", "GPTQ W4A16 asym per channel", RECIPES / "gptq_w4a16_asym_ch.yaml"),
    Recipe("gptq-w4a16-sym-g64-group-aware", "GPTQ W4A16 g64, group-aware order",
           RECIPES / "gptq_w4a16_sym_g64_group_aware.yaml", NO_LLMC),
    Recipe("gptq-w4a16-asym-g64-group-aware", "GPTQ W4A16 asym g64, group-aware order",
           RECIPES / "gptq_w4a16_asym_g64_group_aware.yaml", NO_LLMC),
    # GPTQ aimed at the float model's output: GPTQModel's equal is GPTAQ with the same alpha; llm-compressor has none
    Recipe("gptq-w4a16-g64-float", "GPTQ W4A16 g64, float_target 0.5 (GPTQModel: GPTAQ 0.5)",
           RECIPES / "gptq_w4a16_g64_float.yaml", NO_LLMC),
    Recipe("gptq-w4a16-asym-g64-float", "GPTQ W4A16 asym g64, float_target 0.5 (GPTQModel: GPTAQ 0.5)",
           RECIPES / "gptq_w4a16_asym_g64_float.yaml", NO_LLMC),
    # at GPTQModel's recommended alpha
    Recipe("gptq-w4a16-g64-float25", "GPTQ W4A16 g64, float_target 0.25 (GPTQModel: GPTAQ 0.25)",
           RECIPES / "gptq_w4a16_g64_float25.yaml", NO_LLMC),
    Recipe("gptq-w4a16-asym-g64-float25", "GPTQ W4A16 asym g64, float_target 0.25 (GPTQModel: GPTAQ 0.25)",
           RECIPES / "gptq_w4a16_asym_g64_float25.yaml", NO_LLMC),
    Recipe("awq-w4a16-g64", "AWQ W4A16 g64", RECIPES / "awq_w4a16_g64.yaml", NO_GPTQMODEL),
    # GPTQModel's AWQ always clips; llm-compressor's AWQ does not run on a CPU-only machine (its activation cache pins memory)
    Recipe("awq-clip-w4a16-g64", "AWQ W4A16 g64, apply_clip", RECIPES / "awq_clip_w4a16_g64.yaml", NO_LLMC),
    Recipe("awq-clip-w4a16-asym-g64", "AWQ W4A16 asym g64, apply_clip", RECIPES / "awq_clip_w4a16_asym_g64.yaml", NO_LLMC),
    Recipe("smoothquant-gptq-w8a8", "SmoothQuant 0.8 + GPTQ W8A8", RECIPES / "smoothquant_gptq_w8a8.yaml", NO_GPTQMODEL,
           target=(0.3, 0.6)),
    Recipe("sparsegpt-2of4", "SparseGPT 2:4", RECIPES / "sparsegpt_2of4.yaml", NO_GPTQMODEL),
]
OURS = "modelpress"
PEER_LABELS = {"llmcompressor": "llm-compressor 0.14", "gptqmodel": "GPTQModel 7.7"}


def _load_sampler(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(2.0):
        samples.append(os.getloadavg()[0])


def _time_v(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key:
            fields[key] = value
    return fields


def measure(command: list[str], logs: Path) -> Run:
    """Run `command` to its end, alone; its wall time, CPU time, peak RSS and the load meanwhile."""
    timing = logs.with_suffix(".time")
    if GNU_TIME.is_file():
        command = [str(GNU_TIME), "-v", "-o", str(timing), *command]
    samples = [os.getloadavg()[0]]
    stop = threading.Event()
    sampler = threading.Thread(target=_load_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    start = time.monotonic()
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - start
    stop.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if GNU_TIME.is_file() and timing.is_file():
        fields = _time_v(timing)
        peak_kib = int(fields["Maximum resident set size (kbytes)"])
        cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    else:
        peak_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime  # KiB on Linux
    error = None
    if code != 0:
        lines = [line for line in logs.with_suffix(".err").read_text(errors="replace").splitlines() if line.strip()]
        error = lines[-1][:300] if lines else f"exit {code}"
    return Run(round(wall, 2), round(cpu, 2), round(peak_kib * 1024 / MiB, 1), code, round(statistics.mean(samples), 2), error=error)


def run_side(python: Path, driver: Path, model: Path, recipe: Path, windows: Path, out: Path, logs: Path) -> Run:
    """One side's `oneshot` into a fresh `out`, measured as a whole process."""
    shutil.rmtree(out, ignore_errors=True)
    report = logs.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    run = measure([str(python), str(driver), "--model", str(model), "--recipe", str(recipe), "--windows", str(windows),
                   "--output", str(out), "--report", str(report)], logs)
    if run.exit_code == 0 and report.is_file():
        run.oneshot_s = json.loads(report.read_text())["oneshot_s"]
    return run


def ours(*args: str) -> dict[str, Any]:
    """bench/held_out.py in this venv, its JSON answer."""
    done = subprocess.run([sys.executable, str(BENCH / "held_out.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ChildFailed(f"held_out.py {args[0]}: {lines[-1] if lines else 'exit ' + str(done.returncode)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class ChildFailed(Exception):
    """A helper child exited with an error; its last stderr line is the message."""


def perplexity(model: Path, tokenizer: Path, settings: Settings) -> float | None:
    """The checkpoint's perplexity on the evaluation span; None when it is off or the checkpoint does not load."""
    if not settings.perplexity:
        return None
    try:
        return ours("perplexity", "--model", str(model), "--tokenizer", str(tokenizer), "--text", str(settings.text),
                    "--span", settings.evaluation_span, "--max-tokens", str(settings.perplexity_tokens))["perplexity"]
    except ChildFailed as err:
        print(f"{model}: no perplexity ({err})", file=sys.stderr, flush=True)
        return None


def _median(runs: list[Run], key: str) -> float | None:
    values = [getattr(r, key) for r in runs if r.exit_code == 0 and getattr(r, key) is not None]
    return round(statistics.median(values), 2) if values else None


def summary(runs: list[Run], ppl: float | None) -> dict[str, Any]:
    return {"wall_s": _median(runs, "wall_s"), "cpu_s": _median(runs, "cpu_s"), "oneshot_s": _median(runs, "oneshot_s"),
            "peak_rss_mib": _median(runs, "peak_rss_mib"), "perplexity": ppl, "runs": [asdict(r) for r in runs]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare_case(model_name: str, model: Path, recipe: Recipe, peers: list[Peer], windows: list[Path], settings: Settings,
                 work: Path) -> dict[str, Any]:
    """Every side of one model and recipe, run in turn `repeats` times on each draw of windows, then
    each output's perplexity; with several draws, the perplexity is their mean."""
    sides = [(OURS, sys.executable, BENCH / "peers" / "modelpress_run.py", recipe.ours)]
    sides += [(p.name, p.python, p.driver, recipe.for_peer(p.name)) for p in peers if recipe.for_peer(p.name) is not None]
    runs: dict[str, list[Run]] = {name: [] for name, *_ in sides}
    perplexities: dict[str, list[float | None]] = {name: [] for name, *_ in sides}
    case_dir = work / model_name / recipe.name
    for draw, draw_windows in enumerate(windows):
        draw_dir = case_dir if len(windows) == 1 else case_dir / f"draw-{draw}"
        (draw_dir / "logs").mkdir(parents=True, exist_ok=True)
        for attempt in range(settings.repeats):
            for name, python, driver, file in sides:
                run = run_side(Path(python), driver, model, file, draw_windows, draw_dir / name, draw_dir / "logs" / f"{name}-{attempt}")
                print(json.dumps({"model": model_name, "recipe": recipe.name, "side": name, "draw": draw, "attempt": attempt,
                                  **asdict(run)}), file=sys.stderr, flush=True)
                runs[name].append(run)
        for name, *_ in sides:
            ok = any(r.exit_code == 0 for r in runs[name][-settings.repeats:])
            perplexities[name].append(perplexity(draw_dir / name, model, settings) if ok else None)
    result: dict[str, Any] = {"model": model_name, "recipe": recipe.name, "label": recipe.label, "sides": {}}
    for name, *_ in sides:
        values = perplexities[name]
        mean = round(statistics.fmean(values), 4) if values and None not in values else None
        result["sides"][name] = summary(runs[name], mean)
        if len(windows) > 1:
            result["sides"][name]["perplexities"] = values
    mine = result["sides"][OURS]
    result["ratios"] = {
        name: {"wall": _ratio(mine["wall_s"], side["wall_s"]), "cpu": _ratio(mine["cpu_s"], side["cpu_s"]),
               "oneshot": _ratio(mine["oneshot_s"], side["oneshot_s"]),
               "peak_rss": _ratio(mine["peak_rss_mib"], side["peak_rss_mib"]),
               "perplexity": _ratio(mine["perplexity"], side["perplexity"])}
        for name, side in result["sides"].items() if name != OURS
    }
    if recipe.target and "llmcompressor" in result["ratios"]:
        got = result["ratios"]["llmcompressor"]
        wall, rss = recipe.target
        result["target"] = {"wall": wall, "peak_rss": rss,
                            "met": got["wall"] is not None and got["peak_rss"] is not None and got["wall"] <= wall and got["peak_rss"] <= rss}
    return result


def split_draws(windows: Path, num_samples: int, draws: int) -> list[Path]:
    """The file of `num_samples` x `draws` windows cut into `draws` files of `num_samples`, in order:
    the first is the one a single draw would use (the sampler's order does not depend on the count)."""
    if draws == 1:
        return [windows]
    record = json.loads(windows.read_text())
    files = []
    for draw in range(draws):
        part = windows.with_name(f"windows-{draw}.json")
        ids = record["input_ids"][draw * num_samples : (draw + 1) * num_samples]
        part.write_text(json.dumps({**record, "num_samples": num_samples, "draw": draw, "input_ids": ids}) + "\n")
        files.append(part)
    return files


def prepare_models(names: list[str], work: Path) -> dict[str, Path]:
    """SmolLM2 from its GGUF package and, when asked, the synthetic Llama of bench/memory_bench.py, each by a child."""
    return {name: memory_bench.model_dir(name, work) for name in names}


def run_matrix(models: list[str], recipes: list[Recipe], peers: list[Peer], settings: Settings, work: Path,
               partial: Path | None = None) -> dict[str, Any]:
    """The whole matrix: per model its windows and float perplexity once, then every recipe (the report so far
    rewritten to `partial` after each)."""
    dirs = prepare_models(models, work)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "peers": {p.name: str(p.python) for p in peers},
        "models": {},
        "cases": [],
    }
    for name, model in dirs.items():
        windows = work / name / "windows.json"
        windows.parent.mkdir(parents=True, exist_ok=True)
        ours("windows", "--model", str(model), "--text", str(settings.text), "--span", settings.calibration_span,
             "--num-samples", str(settings.num_samples * settings.draws), "--max-seq-length", str(settings.max_seq_length),
             "--out", str(windows))
        windows = split_draws(windows, settings.num_samples, settings.draws)
        report["models"][name] = {"path": str(model), "float_perplexity": perplexity(model, model, settings)}
        for recipe in recipes:
            report["cases"].append(compare_case(name, model, recipe, peers, windows, settings, work))
            if partial is not None:
                partial.write_text(json.dumps(report, indent=2) + "\n")
    return report


def draws_phrase(settings: dict[str, Any]) -> str:
    draws = settings.get("draws", 1)
    return f"; perplexity the mean over {draws} disjoint draws of calibration windows" if draws > 1 else ""


def _side_cell(side: dict[str, Any]) -> str:
    if side["wall_s"] is None:
        return f"failed: {side['runs'][-1]['error']}"
    ppl = f", {side['perplexity']:.2f}" if side["perplexity"] is not None else ""
    return f"{side['wall_s']:.0f} s, {side['peak_rss_mib']:.0f} MiB{ppl}"


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "—"


def markdown(report: dict[str, Any]) -> str:
    """The README table: each side's wall, peak RSS and perplexity, and per peer the ratios ModelPress / peer."""
    settings = report["settings"]
    lines = [f"{report['machine']}; calibration {settings['num_samples']} × {settings['max_seq_length']} tokens from span "
             f"{settings['calibration_span']} of `{Path(settings['text']).name}`, perplexity on span {settings['evaluation_span']} "
             f"({settings['perplexity_tokens'] or 'all'} tokens); median of {settings['repeats']} run(s) per side{draws_phrase(settings)}.", ""]
    floats = [f"{name} {m['float_perplexity']:.2f}" for name, m in report["models"].items() if m["float_perplexity"] is not None]
    if floats:
        lines += ["Float perplexity: " + ", ".join(floats) + ".", ""]
    peers = list(dict.fromkeys(name for case in report["cases"] for name in case["sides"] if name != OURS))
    head = "".join(f" {PEER_LABELS.get(p, p)} | wall × | peak RSS × | perplexity × |" for p in peers)
    lines += [f"| model | recipe | ModelPress: wall, peak RSS, perplexity |{head} target (wall, RSS) | load |",
              "|---|---|---|" + "---|---|---|---|" * len(peers) + "---|---|"]
    for case in report["cases"]:
        cells = ""
        for peer in peers:
            r = case["ratios"].get(peer, {})
            theirs = _side_cell(case["sides"][peer]) if peer in case["sides"] else "no equivalent"
            cells += f" {theirs} | {_x(r.get('wall'))} | {_x(r.get('peak_rss'))} | {_x(r.get('perplexity'))} |"
        target = case.get("target")
        goal = f"≤ {target['wall']}×, ≤ {target['peak_rss']}×: {'met' if target['met'] else 'missed'}" if target else ""
        loads = [run["load"] for side in case["sides"].values() for run in side["runs"]]
        lines.append(f"| {case['model']} | {case['label']} | {_side_cell(case['sides'][OURS])} |{cells} {goal} | "
                     f"{min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "synthetic"])
    parser.add_argument("--recipes", nargs="+", default=[r.name for r in MATRIX], choices=[r.name for r in MATRIX])
    parser.add_argument("--compare-llmcompressor", type=Path, metavar="VENV", help="llm-compressor's venv (its bin/python runs the peer)")
    parser.add_argument("--compare-gptqmodel", type=Path, metavar="VENV", help="GPTQModel's venv (its bin/python runs the peer)")
    parser.add_argument("--text", type=Path, default=WIKITEXT, help="calibration and evaluation text")
    parser.add_argument("--calibration-span", default="0:0.5", help="fractions of the text calibration reads")
    parser.add_argument("--evaluation-span", default="0.5:1", help="fractions of the text perplexity reads; keep it apart")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--perplexity-tokens", type=int, default=8192, help="0: the whole evaluation span")
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--draws", type=int, default=1, help="disjoint sets of --num-samples windows; perplexity is their mean")
    parser.add_argument("--work", type=Path, default=None, help="models, windows, outputs and logs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=BENCH / "compare.json")
    parser.add_argument("--markdown", type=Path, default=BENCH / "compare.md")
    parser.add_argument("--render", action="store_true", help="run nothing: write the Markdown table of the --json report")
    args = parser.parse_args()

    if args.render:
        args.markdown.write_text(markdown(json.loads(args.json.read_text())))
        print(args.markdown.read_text())
        return

    if not args.text.is_file():
        raise SystemExit(f"--text: {args.text} is not a file; give the calibration and evaluation text")
    peers = [venv_peer(option, venv, name, label)
             for option, venv, name, label in (("--compare-llmcompressor", args.compare_llmcompressor, "llmcompressor", "llm-compressor"),
                                               ("--compare-gptqmodel", args.compare_gptqmodel, "gptqmodel", "GPTQModel"))
             if venv is not None]
    (cal_start, cal_end), (eval_start, eval_end) = parse_span(args.calibration_span), parse_span(args.evaluation_span)
    if cal_start < eval_end and eval_start < cal_end:
        raise SystemExit("--evaluation-span: overlaps --calibration-span; perplexity must be on text calibration never saw")
    if args.repeats < 1 or args.draws < 1 or args.num_samples < 1 or args.max_seq_length < 2:
        raise SystemExit("--repeats, --draws, --num-samples: at least 1; --max-seq-length: at least 2")
    settings = Settings(args.text, args.calibration_span, args.evaluation_span, args.num_samples, args.max_seq_length,
                        args.perplexity_tokens, args.repeats, not args.no_perplexity, args.draws)
    work = args.work or Path(tempfile.mkdtemp(prefix="modelpress-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_matrix(args.models, [r for r in MATRIX if r.name in args.recipes], peers, settings, work, args.json)
    except ChildFailed as err:
        raise SystemExit(str(err)) from None
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
