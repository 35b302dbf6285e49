"""`modelpress` command line: run a CompressionJob, compress a model directly, or write the SmolLM2 fixture.

`modelpress run JOB.yaml` runs a job here exactly as a runner pod would; with no file it reads the
job from the environment, as in the pod (`python -m modelpress.runner`). It exits with the
contract's `ExitCode`; the last stderr line says why, and only `--debug` adds a traceback.
"""

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from modelpress.contract import (DEFAULT_IGNORE, Env, ExitCode, FailureEvent, FailureReason, InvalidSpec, PodPath, ResultEvent,
                                 RunReport, parse_job, quantity_bytes, shown, tree_problem)
from modelpress.engine.errors import ModelPressError

if TYPE_CHECKING:  # the engine imports torch; `modelpress compress` loads it only when it runs
    from modelpress.engine.pipeline import LayerProgress

MAX_JOB_FILE_BYTES = 1 << 20  # a Kubernetes object is at most about this big
DEBUG_HELP = "on failure, print the traceback too"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Compress LLMs into vLLM-ready checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model with a recipe or a preset scheme")
    compress.add_argument("--model", required=True, help="model directory or hub id (org/name)")
    compress.add_argument("--recipe", required=True, help="recipe YAML file, or a preset scheme such as W4A16")
    compress.add_argument("--output", required=True, type=Path, help="directory to write the checkpoint to")
    compress.add_argument("--dataset", help="calibration data: a .txt or .jsonl file")
    compress.add_argument("--group-size", type=int, help="group size for a grouped preset (e.g. 64)")
    compress.add_argument("--observer", choices=["minmax", "mse", "imatrix_mse"], help="weight observer for a preset (imatrix_mse needs --dataset)")
    compress.add_argument("--num-samples", type=int, default=512, help="calibration samples (default 512)")
    compress.add_argument("--max-seq-length", type=int, default=2048, help="tokens per sample (default 2048)")
    compress.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    compress.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    job = commands.add_parser("run", help=f"run a CompressionJob (a manifest, or {Env.SPEC} / {Env.SPEC_FILE})")
    job.add_argument("job", nargs="?", help="CompressionJob YAML; may also hold the Secrets and ConfigMaps it names")
    job.add_argument("--secrets", action="append", default=[], type=Path, help="YAML of Secrets/ConfigMaps the job names")
    job.add_argument("--scratch", type=Path, help=f"work directory (env {Env.SCRATCH}; default ~/.cache/modelpress/jobs)")
    job.add_argument("--termination-log", help=f"where the result goes (env {Env.TERMINATION_LOG}; default {PodPath.TERMINATION_LOG})")
    job.add_argument("--format", choices=["auto", "json", "text"], default="auto", help="stdout: JSON lines, or a summary for people (auto: text on a terminal)")
    job.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    job.add_argument("--memory-limit", help="refuse a job estimated to need more (8Gi; default: the cgroup limit, else the machine)")
    job.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    smollm2 = commands.add_parser("smollm2", help="write SmolLM2-135M-Instruct as a float model directory; print its path")
    smollm2.add_argument("--progress", action="store_true", help="show the GGUF conversion's per-tensor bars")
    return parser


def preset_recipe(preset: str, group_size: int | None, observer: str | None) -> list[Any]:
    """A preset name as an RTN recipe: quantize every Linear but the head, like llm-compressor's examples."""
    from modelpress.engine.recipe import parse_recipe
    from modelpress.runner.presets import preset_document

    return parse_recipe(preset_document(preset, "RTN", list(DEFAULT_IGNORE), group_size, observer))


def recipe_argument(recipe: str, group_size: int | None, observer: str | None) -> Any:
    """`--recipe`: a YAML file (used as it is), or a preset refined by --group-size/--observer."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if group_size or observer:
            raise ModelPressError("--group-size/--observer: only apply to a preset; set them in the recipe file")
        return path
    return preset_recipe(recipe, group_size, observer)


def compress(args: argparse.Namespace) -> None:
    from modelpress.engine.checkpoint_writer import human_bytes
    from modelpress.engine.oneshot import oneshot

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


def _progress_bar() -> Callable[["LayerProgress"], None]:
    """A layer bar on stderr for the engine's progress callback."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: "LayerProgress") -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=done.layers, desc="compress", unit="layer")
        bar["bar"].update(done.layer - bar["bar"].n)
        if done.layer == done.layers:
            bar["bar"].close()

    return update


def memory_limit_argument(text: str | None) -> int | None:
    """`--memory-limit` in bytes (None when not given)."""
    if text is None:
        return None
    try:
        return quantity_bytes(text)
    except ValueError:
        raise ModelPressError(f"--memory-limit: {shown(text)} is not a quantity of bytes; write it like 8Gi or 512Mi") from None


def read_documents(path: str | None, env: dict[str, str]) -> list[Any]:
    """The job file's documents, or the job the pod was given in its environment, each bounded
    (`tree_problem`) before anything walks it: YAML aliases can make a small file a huge tree."""
    try:
        if path:
            documents = _yaml_documents(Path(path))
        elif env.get(Env.SPEC):
            documents = [json.loads(env[Env.SPEC])]
        elif env.get(Env.SPEC_FILE):
            documents = _yaml_documents(Path(env[Env.SPEC_FILE]))
        else:
            raise ModelPressError(f"job: none given; pass JOB.yaml, or set {Env.SPEC} (JSON) or {Env.SPEC_FILE}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError) as err:
        raise ModelPressError(f"job: cannot read it ({one_line(err)})") from None
    for number, document in enumerate(documents, 1):
        problem = tree_problem(document)
        if problem is not None:
            raise ModelPressError(f"job: document {number}: {problem}")
    return documents


def _yaml_documents(file: Path) -> list[Any]:
    size = file.stat().st_size
    if size > MAX_JOB_FILE_BYTES:
        raise ModelPressError(f"job: {file} holds {size} bytes; a job file holds at most {MAX_JOB_FILE_BYTES} (1 MiB)")
    return [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if d is not None]


def one_line(err: BaseException) -> str:
    """An unexpected error as one line: its type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err).strip() else 'no details'}"


def pick_job(documents: list[Any]) -> Any:
    """The CompressionJob among the documents (a lone document is taken as it is, to be validated)."""
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "CompressionJob"]
    if len(jobs) > 1:
        raise ModelPressError(f"job: the file holds {len(jobs)} CompressionJobs; give one per run")
    if not jobs and len(documents) != 1:
        raise ModelPressError("job: no CompressionJob document found (kind: CompressionJob)")
    return jobs[0] if jobs else documents[0]


def run_job_command(args: argparse.Namespace) -> int:
    from modelpress.runner.connections import local_objects, scrub
    from modelpress.runner.progress import Reporter, ScrubFilter, summary, termination_message

    env = dict(os.environ)
    text = args.format == "text" or (args.format == "auto" and sys.stdout.isatty())
    reporter = Reporter(json_lines=not text, bars=sys.stderr.isatty())
    for handler in logging.getLogger().handlers:
        handler.addFilter(ScrubFilter(reporter))
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # transformers' bars count tensors as a model loads: nothing a user waits for
    if sys.stderr.isatty():  # the hub's download bars (stopped above too) say how far a download is; a pod log gets none
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    explicit_log = args.termination_log or env.get(Env.TERMINATION_LOG)

    def finish(event: ResultEvent | FailureEvent) -> int:
        reporter.close()
        reporter.emit(event)
        if text and event.sizes is not None:
            print(scrub(summary(event), reporter.secrets))
        try:
            Path(explicit_log or PodPath.TERMINATION_LOG).write_text(scrub(termination_message(event), reporter.secrets))
        except OSError as err:
            if explicit_log:  # the default path exists only in a pod
                print(f"modelpress: warning: cannot write the termination log {explicit_log} ({err.strerror})", file=sys.stderr)
        if isinstance(event, ResultEvent):
            return ExitCode.OK
        print(f"modelpress: error: {event.message}", file=sys.stderr)
        return event.exit_code

    def fail(code: ExitCode, reason: FailureReason, message: str, report: RunReport | None = None,
             problems: list[str] | None = None) -> int:
        """A FailureEvent carrying as much of the run's report as it got to (a failed gate's metrics)."""
        if args.debug:
            print(scrub(traceback.format_exc(), reporter.secrets), file=sys.stderr, end="")
        made = {name: getattr(report, name) for name in RunReport.model_fields} if report is not None else {}
        return finish(FailureEvent(**made, reason=reason, exit_code=code, message=scrub(message, reporter.secrets),
                                   problems=problems))

    from modelpress.runner.run import Context, GateFailed, run_job

    try:
        documents = read_documents(args.job, env)
        extra = [d for path in args.secrets for d in read_documents(str(path), env)]
        job = parse_job(pick_job(documents))
        scratch = args.scratch or Path(env.get(Env.SCRATCH) or Path.home() / ".cache" / "modelpress" / "jobs")
        context = Context(env=env, objects=local_objects(documents + extra), scratch=scratch, reporter=reporter, device=args.device,
                          memory_limit=memory_limit_argument(args.memory_limit))
        return finish(run_job(job, context))
    except InvalidSpec as err:
        for problem in err.problems if len(err.problems) > 1 else ():
            print(f"  {problem}", file=sys.stderr)
        return fail(ExitCode.INVALID_INPUT, "InvalidSpec", f"invalid CompressionJob: {err}", problems=err.problems)
    except ModelPressError as err:
        return fail(ExitCode.INVALID_INPUT, "InvalidInput", str(err))
    except GateFailed as err:
        return fail(ExitCode.QUALITY_GATE_FAILED, "QualityGateFailed", str(err), err.result)
    except Exception as err:  # anything else may be transient: a retryable exit lets the Job retry
        return fail(ExitCode.RETRYABLE, "Error", one_line(err))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return run_job_command(args)
    try:
        if args.command == "compress":
            compress(args)
        else:
            from modelpress.runner.smollm2 import smollm2_dir

            print(smollm2_dir(progress=args.progress))
    except ModelPressError as err:
        return _failed(args, ExitCode.INVALID_INPUT, str(err))
    except Exception as err:  # unexpected, so perhaps transient
        return _failed(args, ExitCode.RETRYABLE, one_line(err))
    return ExitCode.OK


def _failed(args: argparse.Namespace, code: ExitCode, message: str) -> int:
    """One line on stderr (after the traceback, with --debug) and the exit code."""
    if getattr(args, "debug", False):
        print(traceback.format_exc(), file=sys.stderr, end="")
    print(f"modelpress: error: {message}", file=sys.stderr)
    return code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
