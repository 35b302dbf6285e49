"""One CompressionJob from spec to published model: fetch, calibrate, compress, evaluate, publish.

Work happens in a scratch directory (`MODELPRESS_SCRATCH`, the pod's volume). A retried job
resumes there: downloads continue from their `.part` files, a model already compressed for the
same spec is not compressed again, and files already uploaded are not sent again.
"""

import gc
import hashlib
import importlib.metadata
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from modelpress.runner.connections import LocalObjects, S3Connection, hf_token, recipe_text, s3_connection, secret_values
from modelpress.runner.data import calibration_set, evaluation_text, open_dataset, self_generated
from modelpress.engine.checkpoint_writer import model_bytes as output_bytes
from modelpress.engine.errors import ModelPressError
from modelpress.engine.modifier import Modifier
from modelpress.engine.recipe import load_recipe, parse_recipe, recipe_yaml
from modelpress.runner.progress import Reporter
from modelpress.runner.presets import preset_document
from modelpress.contract import SELF_GENERATED, CompressionJob, JobSpec, Recipe
from modelpress.runner.storage import (
    DirOutput,
    S3Output,
    build_manifest,
    download_object,
    download_prefix,
    fetch_hub_model,
    list_objects,
    local_path,
    s3_client,
    split_uri,
)

COMPRESSED_MARKER = "compressed.done"  # holds the fingerprint of the spec the staged model was made for
VERSIONED = ("modelpress", "torch", "transformers", "compressed-tensors")


class GateFailed(Exception):
    """The compressed model lost more quality than `maxPerplexityIncrease` allows."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Context:
    """Everything a job reads besides its spec: the environment, local Secrets/ConfigMaps, scratch."""

    env: Mapping[str, str]
    objects: LocalObjects
    scratch: Path
    reporter: Reporter
    device: str | None = None
    durations: dict[str, float] = field(default_factory=dict)


def run_job(job: CompressionJob, ctx: Context) -> dict[str, Any]:
    """Run the job; return the result object (raise ModelPressError for bad input, GateFailed)."""
    start = time.monotonic()
    spec, env, report = job.spec, ctx.env, ctx.reporter
    job_id = job_identity(job)
    connections = _connections(spec, ctx)
    token = hf_token(spec.model.token_secret, env, ctx.objects)
    report.secrets = secret_values(list(connections.values()), token)
    clients = {role: s3_client(conn) for role, conn in connections.items()}

    output = (
        S3Output(clients["output"], spec.output.uri)
        if spec.output.uri.startswith("s3://")
        else DirOutput(local_path(spec.output.uri, env), spec.output.uri)
    )
    output.check(job_id, spec.output.overwrite)
    modifiers = job_recipe(spec.recipe, env, ctx.objects)
    needs_data = any(m.needs_data() for m in modifiers)
    if needs_data and spec.calibration.dataset is None:
        raise ModelPressError(f"spec.calibration.dataset: the recipe needs calibration data; give a dataset or {SELF_GENERATED}")

    work = ctx.scratch / _safe(job_id)
    work.mkdir(parents=True, exist_ok=True)
    with _timed(ctx, "fetch"):
        report.stage("fetch", uri=spec.model.uri)
        model_dir = fetch_model(spec, clients.get("model"), token, work, ctx)

    staged, marker, fingerprint = work / "model", work / COMPRESSED_MARKER, spec_fingerprint(spec)
    resumed = marker.is_file() and marker.read_text() == fingerprint and staged.is_dir()
    evaluation = spec.evaluation
    wants_eval = evaluation.perplexity is not None or bool(evaluation.prompts)
    device = torch.device(ctx.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = None
    samples: list[torch.Tensor] = []
    if (needs_data and not resumed) or wants_eval:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    text = _evaluation_text(spec, clients, work, token, env) if evaluation.perplexity else None
    calib = spec.calibration
    with _timed(ctx, "calibrate"):
        if needs_data and not resumed and calib.dataset != SELF_GENERATED:
            report.stage("calibrate", dataset=calib.dataset)
            data = open_dataset(calib.dataset, calib.split, calib.subset, "spec.calibration.dataset",
                                _local_fetcher(clients, work, env, "spec.calibration.dataset"), token)
            samples = calibration_set(data, tokenizer, calib.num_samples, calib.max_sequence_length, calib.seed,
                                      calib.text_field, calib.messages_field)
    before: dict[str, Any] = {}
    if (needs_data and not resumed and calib.dataset == SELF_GENERATED) or wants_eval:
        original = load_model(model_dir, device, spec.model.trust_remote_code)
        if needs_data and not resumed and calib.dataset == SELF_GENERATED:
            with _timed(ctx, "calibrate"):
                report.stage("calibrate", dataset=SELF_GENERATED)
                samples = self_generated(original, tokenizer, calib.num_samples, calib.max_sequence_length, calib.seed)
        if wants_eval:
            with _timed(ctx, "evaluate"):
                report.stage("evaluate", model="original")
                before = evaluate(original, tokenizer, text, spec)
        del original
        gc.collect()

    with _timed(ctx, "compress"):
        if not resumed:
            report.stage("compress")
            marker.unlink(missing_ok=True)
            shutil.rmtree(staged, ignore_errors=True)
            _compress(model_dir, staged, modifiers, samples, spec, device, report)
            marker.write_text(fingerprint)

    after: dict[str, Any] = {}
    if wants_eval:
        with _timed(ctx, "evaluate"):
            report.stage("evaluate", model="compressed")
            compressed = load_model(staged, device, spec.model.trust_remote_code)
            after = evaluate(compressed, tokenizer, text, spec)
            del compressed
            gc.collect()

    result = build_result(job, model_dir, staged, before, after, modifiers, resumed, needs_data)
    gate = result["metrics"].get("gate")
    if gate is not None and not gate["passed"]:
        result["durationsS"] = _durations(ctx, start)
        raise GateFailed(
            f"perplexity rose {result['metrics']['perplexityIncreasePercent']:.1f}%, past the "
            f"{gate['maxPerplexityIncrease']}% allowed by spec.evaluation.maxPerplexityIncrease; nothing was published",
            result,
        )

    (staged / "README.md").write_text(model_card(job, result, recipe_yaml(modifiers)))
    with _timed(ctx, "publish"):
        report.stage("publish", uri=spec.output.uri)
        manifest = build_manifest(staged, _job_meta(job), result["versions"])
        transfer = output.publish(staged, manifest, job_id, report.byte_counter("publish", manifest["totalBytes"]))
    result["output"]["files"] = len(manifest["files"])
    result["output"]["uploadedBytes"] = transfer.bytes
    shutil.rmtree(work, ignore_errors=True)
    result["durationsS"] = _durations(ctx, start)
    return result


def _connections(spec: JobSpec, ctx: Context) -> dict[str, S3Connection]:
    """S3 connections by role, resolved before any work so missing credentials fail first."""
    ppl = spec.evaluation.perplexity
    uses = {
        "model": ([spec.model.uri], spec.model.connection, "spec.model.connection"),
        "data": ([spec.calibration.dataset, ppl.dataset if ppl else None], spec.calibration.connection, "spec.calibration.connection"),
        "output": ([spec.output.uri], spec.output.connection, "spec.output.connection"),
    }
    return {
        role: s3_connection(role, name, ctx.env, ctx.objects, where)
        for role, (uris, name, where) in uses.items()
        if any(u and u.startswith("s3://") for u in uris)
    }


def job_recipe(recipe: Recipe, env: Mapping[str, str], objects: LocalObjects) -> list[Modifier]:
    """The job's modifiers, from a preset, inline modifiers, or a ConfigMap's YAML."""
    try:
        if recipe.preset is not None:
            return parse_recipe(preset_document(recipe.preset, recipe.algorithm, recipe.ignore, recipe.group_size))
        if recipe.modifiers is not None:
            return parse_recipe(recipe.modifiers)
        return load_recipe(recipe_text(recipe.config_map, env, objects))
    except ModelPressError as err:
        message = str(err)
        raise ModelPressError(message if message.startswith("spec.") else f"spec.recipe: {message}") from None


def fetch_model(spec: JobSpec, client: Any, token: str | None, work: Path, ctx: Context) -> Path:
    """A local model directory: the hub cache, a download into scratch, or the path/PVC itself."""
    uri = spec.model.uri
    if uri.startswith("hf://"):
        return fetch_hub_model(uri, spec.model.revision, token)
    if uri.startswith("s3://"):
        bucket, prefix = split_uri(uri)
        total = sum(o["Size"] for o in list_objects(client, bucket, prefix).values())
        dest = work / "source"
        transfer = download_prefix(client, bucket, prefix, dest, ctx.reporter.byte_counter("fetch", total))
        ctx.reporter.emit({"event": "transfer", "stage": "fetch", "files": transfer.files, "bytes": transfer.bytes,
                           "skippedFiles": transfer.skipped_files, "resumedBytes": transfer.resumed_bytes})
        return dest
    path = local_path(uri, ctx.env)
    if not (path / "config.json").is_file():
        raise ModelPressError(f"spec.model.uri: {uri} is not a model directory (no config.json there)")
    return path


def _local_fetcher(clients: dict[str, Any], work: Path, env: Mapping[str, str], field_path: str):
    """Maps a data URI to a local file: s3:// objects are downloaded (resumably) into scratch."""

    def local(uri: str) -> Path:
        if not uri.startswith("s3://"):
            return local_path(uri, env)
        bucket, key = split_uri(uri)
        found = list_objects(clients["data"], bucket, key.rsplit("/", 1)[0] if "/" in key else "")
        meta = found.get(key.rsplit("/", 1)[-1])
        if meta is None:
            raise ModelPressError(f"{field_path}: {uri} does not exist; check the key and connection")
        target = work / "data" / key
        download_object(clients["data"], bucket, key, meta["Size"], target, meta["ETag"], None, lambda n: None)
        return target

    return local


def _evaluation_text(spec: JobSpec, clients: dict[str, Any], work: Path, token: str | None, env: Mapping[str, str]) -> str:
    ppl = spec.evaluation.perplexity
    data = open_dataset(ppl.dataset, ppl.split, ppl.subset, "spec.evaluation.perplexity.dataset",
                        _local_fetcher(clients, work, env, "spec.evaluation.perplexity.dataset"), token)
    text = evaluation_text(data, ppl.text_field, ppl.max_tokens * 16)
    if not text.strip():
        raise ModelPressError("spec.evaluation.perplexity.dataset: holds no text; check textField and split")
    return text


def _compress(model_dir: Path, staged: Path, modifiers: list[Modifier], samples: list[torch.Tensor],
              spec: JobSpec, device: torch.device, report: Reporter) -> None:
    import datasets

    from modelpress.engine.oneshot import oneshot

    dataset = datasets.Dataset.from_dict({"input_ids": [s[0].tolist() for s in samples]}) if samples else None
    oneshot(
        model=model_dir,
        dataset=dataset,
        recipe=modifiers,
        num_calibration_samples=len(samples) or spec.calibration.num_samples,
        max_seq_length=spec.calibration.max_sequence_length,
        output_dir=staged,
        device=device,
        seed=spec.calibration.seed,
        trust_remote_code=spec.model.trust_remote_code,
        progress=report.progress,
    )


def load_model(path: Path, device: torch.device, trust_remote_code: bool) -> Any:
    """A model for evaluation; compressed checkpoints are dequantized on load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    warnings.filterwarnings("ignore", message="You passed `quantization_config`")
    config = json.loads((path / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "quantization_config" in config else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code, **extra)
    return model.to(device).eval()


def evaluate(model: Any, tokenizer: Any, text: str | None, spec: JobSpec) -> dict[str, Any]:
    from modelpress.runner.evaluation import answer, perplexity

    out: dict[str, Any] = {}
    if text is not None:
        window = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
        out["perplexity"] = perplexity(model, tokenizer, text, spec.evaluation.perplexity.max_tokens, window)
    out["answers"] = [answer(model, tokenizer, p, spec.evaluation.max_new_tokens) for p in spec.evaluation.prompts]
    return out


def build_result(job: CompressionJob, model_dir: Path, staged: Path, before: dict[str, Any], after: dict[str, Any],
                 modifiers: list[Modifier], resumed: bool, used_data: bool) -> dict[str, Any]:
    """The result object: what was made, how big, how good (camelCase, as it lands in status.result)."""
    spec = job.spec
    original, compressed = output_bytes(model_dir), output_bytes(staged)
    metrics: dict[str, Any] = {}
    if "perplexity" in before:
        increase = 100 * (after["perplexity"] / before["perplexity"] - 1)
        metrics = {
            "perplexityOriginal": round(before["perplexity"], 4),
            "perplexityCompressed": round(after["perplexity"], 4),
            "perplexityIncreasePercent": round(increase, 2),
        }
        limit = spec.evaluation.max_perplexity_increase
        if limit is not None:
            metrics["gate"] = {"maxPerplexityIncrease": limit, "passed": increase <= limit}
    recipe = spec.recipe
    names = [type(m).__name__ for m in modifiers]
    return {
        "event": "result",
        "status": "Succeeded",
        "job": _job_meta(job),
        "model": {"uri": spec.model.uri, **({"revision": spec.model.revision} if spec.model.revision else {})},
        "output": {"uri": spec.output.uri},
        "recipe": {
            "summary": f"{recipe.algorithm} {recipe.preset}" if recipe.preset else " + ".join(names),
            "modifiers": names,
        },
        "calibration": {"dataset": spec.calibration.dataset, "samples": spec.calibration.num_samples} if used_data else None,
        "sizes": {"originalBytes": original, "compressedBytes": compressed, "ratio": round(original / compressed, 3) if compressed else 0.0},
        "metrics": metrics,
        "answers": [
            {"prompt": p, "original": a, "compressed": b}
            for p, a, b in zip(spec.evaluation.prompts, before.get("answers", []), after.get("answers", []))
        ],
        "resumedCompression": resumed,
        "versions": versions(),
    }


def model_card(job: CompressionJob, result: dict[str, Any], recipe: str) -> str:
    """README.md of the output: where it came from, how it was made, how good it is, how to serve it."""
    spec = job.spec
    name = job.metadata.name
    uri = spec.output.uri
    if uri.startswith("s3://"):
        serve = f"aws s3 sync {uri} {name}   # with --endpoint-url for your S3 endpoint\nvllm serve {name}"
    elif uri.startswith("pvc://"):
        claim, path = split_uri(uri)
        serve = f"# mount the claim {claim} and serve the directory {path or '/'} on it\nvllm serve /mnt/models"
    else:
        serve = f"vllm serve {Path(uri).expanduser().resolve()}"
    metrics = result["metrics"]
    lines = [
        "---",
        f"base_model: {spec.model.uri.removeprefix('hf://')}",
        "library_name: transformers",
        "tags: [modelpress, compressed-tensors]",
        "---",
        f"# {name}",
        "",
        f"`{spec.model.uri}`{f' at revision `{spec.model.revision}`' if spec.model.revision else ''} compressed by "
        f"ModelPress with {result['recipe']['summary']}, stored as a compressed-tensors checkpoint that vLLM loads as it is.",
        "",
        "## Serve",
        "",
        "```bash",
        serve,
        "```",
        "",
        "## Size and quality",
        "",
        "| | original | compressed |",
        "|---|---|---|",
        f"| weights | {result['sizes']['originalBytes']:,} bytes | {result['sizes']['compressedBytes']:,} bytes ({result['sizes']['ratio']}x smaller) |",
    ]
    if metrics:
        lines.append(f"| perplexity | {metrics['perplexityOriginal']} | {metrics['perplexityCompressed']} "
                     f"({metrics['perplexityIncreasePercent']:+.2f}%) |")
        lines.append(f"\nPerplexity on `{spec.evaluation.perplexity.dataset}` ({spec.evaluation.perplexity.max_tokens} tokens at most).")
    for item in result["answers"]:
        lines += ["", f"**{item['prompt']}**", "", f"- original: {item['original']}", f"- compressed: {item['compressed']}"]
    calib = spec.calibration
    lines += [
        "",
        "## Recipe",
        "",
        f"Calibration: `{calib.dataset}`, {calib.num_samples} samples of at most {calib.max_sequence_length} tokens, seed {calib.seed}."
        if result["calibration"] else "Calibration: none (the recipe needs no data).",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def job_identity(job: CompressionJob) -> str:
    """Who owns an output: namespace/name/uid in a cluster, name and spec fingerprint on a laptop."""
    meta = job.metadata
    return f"{meta.namespace or 'local'}/{meta.name}/{meta.uid or spec_fingerprint(job.spec)[:16]}"


def spec_fingerprint(spec: JobSpec) -> str:
    """Changes whenever what the compressed model depends on changes (not the evaluation or output)."""
    body = spec.model_dump(mode="json", include={"model", "recipe", "calibration"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def _job_meta(job: CompressionJob) -> dict[str, str]:
    meta = job.metadata
    return {k: v for k, v in (("name", meta.name), ("namespace", meta.namespace), ("uid", meta.uid)) if v}


def _safe(job_id: str) -> str:
    return job_id.replace("/", "_")


class _timed:
    """Adds the time spent in a block to ctx.durations[stage]."""

    def __init__(self, ctx: Context, stage: str) -> None:
        self.ctx, self.stage = ctx, stage

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.ctx.durations[self.stage] = self.ctx.durations.get(self.stage, 0.0) + time.monotonic() - self.start


def _durations(ctx: Context, start: float) -> dict[str, float]:
    return {**{k: round(v, 2) for k, v in ctx.durations.items()}, "total": round(time.monotonic() - start, 2)}
