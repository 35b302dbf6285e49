"""The result of a run: what was made, how big, how good, with which versions (a ResultEvent)."""

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Sequence

from modelpress.contract import (
    Answer,
    CalibrationRef,
    CompressionJob,
    Gate,
    JobRef,
    JobSpec,
    Metrics,
    ModelRef,
    OutputRef,
    RecipeRef,
    ResultEvent,
    Served,
    ServedNll,
    Sizes,
)
from modelpress.engine.checkpoint_writer import model_bytes

VERSIONED = ("modelpress", "torch", "transformers", "compressed-tensors")


def build_result(job: CompressionJob, model_dir: Path, staged: Path, before: dict[str, Any], after: dict[str, Any],
                 modifier_names: Sequence[str], resumed: bool, used_data: bool, served: Served | None = None,
                 served_nll: ServedNll | None = None) -> ResultEvent:
    """The result of a compressed (not yet published) model, measured against the original (and served by vLLM when asked)."""
    spec = job.spec
    original, compressed = model_bytes(model_dir), model_bytes(staged)
    metrics = Metrics()
    if "perplexity" in before:
        increase = 100 * (after["perplexity"] / before["perplexity"] - 1)
        limit = spec.evaluation.max_perplexity_increase
        metrics = Metrics(
            perplexity_original=round(before["perplexity"], 4),
            perplexity_compressed=round(after["perplexity"], 4),
            perplexity_increase_percent=round(increase, 2),
            gate=Gate(max_perplexity_increase=limit, passed=increase <= limit) if limit is not None else None,
        )
    metrics.served_nll = served_nll
    recipe = spec.recipe
    return ResultEvent(
        job=job_ref(job),
        model=ModelRef(uri=spec.model.uri, revision=spec.model.revision),
        output=OutputRef(uri=spec.output.uri),
        recipe=RecipeRef(
            summary=f"{recipe.algorithm} {recipe.preset}" if recipe.preset else " + ".join(modifier_names),
            modifiers=list(modifier_names),
        ),
        calibration=CalibrationRef(dataset=spec.calibration.dataset, samples=spec.calibration.num_samples) if used_data else None,
        sizes=Sizes(original_bytes=original, compressed_bytes=compressed, ratio=round(original / compressed, 3) if compressed else 0.0),
        metrics=metrics,
        answers=[
            Answer(prompt=p, original=a, compressed=b)
            for p, a, b in zip(spec.evaluation.prompts, before.get("answers", []), after.get("answers", []))
        ],
        answers_skipped=before.get("answers_skipped") or after.get("answers_skipped"),
        served=served,
        resumed_compression=resumed,
        versions=versions(),
    )


def job_ref(job: CompressionJob) -> JobRef:
    meta = job.metadata
    return JobRef(name=meta.name, namespace=meta.namespace, uid=meta.uid)


def job_identity(job: CompressionJob) -> str:
    """Who owns an output: namespace/name/uid in a cluster, name and spec fingerprint on a laptop."""
    meta = job.metadata
    return f"{meta.namespace or 'local'}/{meta.name}/{meta.uid or spec_fingerprint(job.spec)[:16]}"


def spec_fingerprint(spec: JobSpec) -> str:
    """Changes whenever what the compressed model depends on changes (not the evaluation or output)."""
    body = spec.model_dump(mode="json", include={"model", "recipe", "calibration"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def reuse_key(spec: JobSpec, source: str | None) -> str:
    """What work kept in scratch was made from: the spec's fingerprint and the source's identity."""
    return hashlib.sha256(f"{spec_fingerprint(spec)}\n{source}".encode()).hexdigest()


def versions() -> dict[str, str]:
    """The versions that made the model, for the manifest and the model card."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
