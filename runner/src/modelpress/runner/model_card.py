"""README.md of a published model: where it came from, how it was made, how good it is, how to serve it."""

from pathlib import Path

from modelpress.contract import CompressionJob, ResultEvent, parse_uri


def model_card(job: CompressionJob, result: ResultEvent, recipe: str) -> str:
    """The model card, in the hub's format (YAML front matter, then Markdown)."""
    spec = job.spec
    name = job.metadata.name
    output = parse_uri(spec.output.uri)
    if output.scheme == "s3":
        serve = f"aws s3 sync {output} {name}   # with --endpoint-url for your S3 endpoint\nvllm serve {name}"
    elif output.scheme == "pvc":
        serve = f"# mount the claim {output.root} and serve the directory {output.path or '/'} on it\nvllm serve /mnt/models"
    else:
        serve = f"vllm serve {Path(output.path).expanduser().resolve()}"
    model = parse_uri(spec.model.uri)
    sizes, metrics = result.sizes, result.metrics
    lines = [
        "---",
        f"base_model: {model.root if model.scheme == 'hf' else model.text}",
        "library_name: transformers",
        "tags: [modelpress, compressed-tensors]",
        "---",
        f"# {name}",
        "",
        f"`{spec.model.uri}`{f' at revision `{spec.model.revision}`' if spec.model.revision else ''} compressed by "
        f"ModelPress with {result.recipe.summary}, stored as a compressed-tensors checkpoint that vLLM loads as it is.",
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
        f"| weights | {sizes.original_bytes:,} bytes | {sizes.compressed_bytes:,} bytes ({sizes.ratio}x smaller) |",
    ]
    if metrics.perplexity_original is not None:
        lines.append(f"| perplexity | {metrics.perplexity_original} | {metrics.perplexity_compressed} "
                     f"({metrics.perplexity_increase_percent:+.2f}%) |")
        lines.append(f"\nPerplexity on `{spec.evaluation.perplexity.dataset}` ({spec.evaluation.perplexity.max_tokens} tokens at most).")
    for item in result.answers:
        lines += ["", f"**{item.prompt}**", "", f"- original: {item.original}", f"- compressed: {item.compressed}"]
    calib = spec.calibration
    lines += [
        "",
        "## Recipe",
        "",
        f"Calibration: `{calib.dataset}`, {calib.num_samples} samples of at most {calib.max_sequence_length} tokens, seed {calib.seed}."
        if result.calibration else "Calibration: none (the recipe needs no data).",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()),
        "",
    ]
    return "\n".join(lines)
