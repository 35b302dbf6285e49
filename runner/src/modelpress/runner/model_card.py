"""README.md of a published model: where it came from, how it was made, how good it is, how to serve it."""

from pathlib import Path

from modelpress.contract import CompressionJob, ResultEvent, human_bytes, parse_uri
from modelpress.engine.recipe import load_recipe
from modelpress.engine.rtn import QuantizationModifier
from modelpress.runner.presets import SERVED_AS

def model_card(job: CompressionJob, result: ResultEvent, recipe: str, untied_head_bytes: int | None = None) -> str:
    """The model card, in the hub's format (YAML front matter, then Markdown).

    `untied_head_bytes`: what the output's own head costs, when the source tied it to the input
    embeddings and the output does not (R1 rotations rotate the two differently)."""
    spec = job.spec
    name = job.metadata.name
    output = parse_uri(spec.output.uri)
    if output.scheme == "s3":
        local = name
        fetch = f"aws s3 sync {output} {name}   # with --endpoint-url for your S3 endpoint\n"
    elif output.scheme == "pvc":
        local = "/mnt/models"
        fetch = f"# mount the claim {output.root} and serve the directory {output.path or '/'} on it\n"
    else:
        local, fetch = str(Path(output.path).expanduser().resolve()), ""
    serve = f"{fetch}vllm serve {local}"
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
        *([f"vLLM serves it as {SERVED_AS[spec.recipe.preset]}.", ""] if spec.recipe.preset in SERVED_AS else []),
        *outside_vllm(recipe, local),
        "## Size and quality",
        "",
        "| | original | compressed |",
        "|---|---|---|",
        f"| weights | {sizes.original_bytes:,} bytes | {sizes.compressed_bytes:,} bytes ({sizes.ratio}x smaller) |",
    ]
    if untied_head_bytes is not None:
        lines.append(f"\nThe original ties its output head to its input embeddings; the rotations fused into this model turn "
                     f"the two differently, so the head is stored as its own tensor: {human_bytes(untied_head_bytes)} "
                     f"({untied_head_bytes:,} bytes) of the compressed size.")
    if metrics.perplexity_original is not None:
        lines.append(f"| perplexity | {metrics.perplexity_original} | {metrics.perplexity_compressed} "
                     f"({metrics.perplexity_increase_percent:+.2f}%) |")
        lines.append(f"\nPerplexity on `{spec.evaluation.perplexity.dataset}` ({spec.evaluation.perplexity.max_tokens} tokens at most).")
    for item in result.answers:
        lines += ["", f"**{item.prompt}**", "", f"- original: {item.original}", f"- compressed: {item.compressed}"]
    lines += served_section(result)
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


def served_section(result: ResultEvent) -> list[str]:
    """What vLLM made of the output before it was published (spec.evaluation.servable), when it was asked."""
    served, nll = result.served, result.metrics.served_nll if result.metrics else None
    if served is None:
        return []
    lines = ["", "## Served by vLLM", ""]
    if not served.loaded:
        return lines + [f"{served.served_by} could not load or run this output: {served.reason}"]
    how = f" ({served.quantization}, {', '.join(served.kernels)})" if served.quantization and served.kernels else ""
    lines.append(f"Loaded by {served.served_by}{how} before it was published, and checked against transformers on the same checkpoint.")
    if nll is not None:
        lines += ["", "| token NLL of the evaluation text | vLLM | transformers | difference |", "|---|---|---|---|",
                  f"| {served.tokens} tokens | {nll.vllm:.4f} | {nll.transformers:.4f} | {100 * nll.relative_difference:+.2f}% "
                  f"(bound ±{100 * nll.bound:g}%) |"]
    for item in served.answers or []:
        lines += ["", f"**{item.prompt}**", "", f"- vLLM: {item.answer}"]
    return lines


def outside_vllm(recipe: str, model_dir: str) -> list[str]:
    """How transformers loads this output. Its compressed loader takes every scheme ModelPress writes
    except asymmetric int4: compressed-tensors packs those zero points into int32 words along the
    output rows, transformers 5.24 allocates them unpacked and stops at the size mismatch, and only
    dequantizing while loading reads them (checked in tests/engine/test_vllm_compat.py)."""
    schemes = [s for m in load_recipe(recipe) if isinstance(m, QuantizationModifier) for s in m.groups.values()]
    load = f'model = AutoModelForCausalLM.from_pretrained("{model_dir}"'
    dequantize = "quantization_config=CompressedTensorsConfig(dequantize=True)"
    if not schemes:
        code = ["from transformers import AutoModelForCausalLM", "", f"{load})"]
        note = "The weights are plain floats (pruned, not quantized); transformers loads them like the original's."
    elif any(s.weights.type == "int" and not s.weights.symmetric for s in schemes):
        code = ["from transformers import AutoModelForCausalLM, CompressedTensorsConfig", "", f"{load}, {dequantize})"]
        note = ("The int4 weights are asymmetric: their zero points are packed into int32 words, as compressed-tensors "
                "writes them. transformers' compressed loader (checked with transformers 5.24) refuses them with a size "
                "mismatch on `weight_zero_point`; `CompressedTensorsConfig(dequantize=True)` loads them, as float weights "
                "the size of the original model's.")
    else:
        code = ["from transformers import AutoModelForCausalLM, CompressedTensorsConfig", "",
                f"{load})  # needs the compressed-tensors package", f"# or, decompressed while loading: {load}, {dequantize})"]
        note = ("transformers loads the layers as they are stored and decompresses each the first time it runs; with "
                "`dequantize=True` it decompresses them while loading, to the size of the original model.")
    return ["## Load it outside vLLM", "", "```python", *code, "```", "", note, ""]
