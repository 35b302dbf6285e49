"""`oneshot`: compress a model with a recipe in one pass and write a vLLM-ready checkpoint."""

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme
from transformers import AutoTokenizer, PreTrainedModel

from modelpress.engine.calibration import CalibrationData, calibration_samples
from modelpress.engine.checkpoint_writer import (
    ShardedSafetensorsWriter,
    copy_aux_files,
    output_bytes,
    quantization_config,
    write_module,
)
from modelpress.engine.errors import ModelPressError
from modelpress.engine.experts import (
    ExpertLayout,
    expert_layout,
    from_checkpoint_name,
    route_all_tokens,
    to_checkpoint_name,
    unfuse_experts,
)
from modelpress.engine.modifiers import LayerState, Modifier
from modelpress.engine.pipeline import LayerReport, ProgressFn, capture_first_layer_inputs, run_pipeline
from modelpress.engine.recipe import RecipeInput, load_recipe, recipe_yaml
from modelpress.engine.weights import (
    SafetensorsSource,
    build_skeleton,
    find_decoder_layers,
    load_config,
    materialize,
    missing_weights,
    move_outside,
    resolve_model_dir,
)

log = logging.getLogger(__name__)

REPORT_FILE = "modelpress-report.json"


@dataclass
class OneshotResult:
    output_dir: Path | None
    quantized_modules: int
    layers: list[LayerReport]
    input_bytes: int
    output_bytes: int
    seconds: float
    model: torch.nn.Module | None = field(default=None, repr=False)  # only when a loaded model was given

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else 0.0


def oneshot(
    model: str | Path | PreTrainedModel,
    dataset: CalibrationData | None = None,
    recipe: RecipeInput | None = None,
    num_calibration_samples: int = 512,
    max_seq_length: int = 2048,
    output_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    seed: int = 42,
    text_field: str = "text",
    messages_field: str = "messages",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: ProgressFn | None = None,
) -> OneshotResult:
    """Apply `recipe` to `model` layer by layer and, with `output_dir`, write the checkpoint.

    `model` is a model directory, a hub id, or a loaded transformers model (compressed in place;
    its weights become the dequantized quantized weights). A directory or hub id is streamed:
    only one decoder layer is in memory at a time.
    """
    start = time.monotonic()
    if recipe is None:
        raise ModelPressError("recipe: missing; give modifiers or a YAML recipe")
    modifiers = load_recipe(recipe)
    device = torch.device(device) if device is not None else _default_device()

    if isinstance(model, torch.nn.Module):
        model_dir = Path(model.name_or_path) if Path(getattr(model, "name_or_path", "") or "-").is_dir() else None
        source = None
        input_bytes = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
        layout = expert_layout(model.config.model_type)
        unfuse_experts(model, layout)
    else:
        if output_dir is None:
            raise ModelPressError("output_dir: required when the model is given by path or hub id")
        model_dir = resolve_model_dir(model, revision)
        model_config = load_config(model_dir, trust_remote_code)
        layout = expert_layout(model_config.model_type)
        source = SafetensorsSource(model_dir, lambda name: from_checkpoint_name(name, layout))
        model = build_skeleton(model_config, trust_remote_code)
        unfuse_experts(model, layout)
        missing = missing_weights(model, source)
        if missing:
            raise ModelPressError(
                f"model: the checkpoint in {model_dir} lacks {len(missing)} weight(s) the architecture expects "
                f"(first: {missing[0]}); is it a complete transformers checkpoint?"
            )
        input_bytes = source.nbytes()
    config = copy.deepcopy(model.config)

    layers_prefix, layers = find_decoder_layers(model)
    inside = f"{layers_prefix}."
    plans = [m.plan(model) for m in modifiers]
    _check_plans(modifiers, plans)
    for modifier in modifiers:
        modifier.bind(modifiers)
    needs_data = any(m.needs_data() for m in modifiers)
    if needs_data:
        if dataset is None:
            raise ModelPressError("dataset: the recipe needs calibration data (static activation scales); pass a dataset")
        outside = sorted(n for plan in plans for n in plan if not n.startswith(inside))
        if outside:
            raise ModelPressError(f"ignore: {outside} sit outside the decoder layers and cannot be calibrated; add them to ignore")

    out = _prepare_output(output_dir)
    if source is not None:
        materialize(model, "", source, device, skip_prefix=inside)
        model.tie_weights()
    home = next(p.device for n, p in model.named_parameters() if not n.startswith(inside))
    move_outside(model, inside, device)

    inputs = None
    if needs_data:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir or model.name_or_path, trust_remote_code=trust_remote_code)
        samples = calibration_samples(
            dataset, tokenizer, num_calibration_samples, max_seq_length, seed, text_field, messages_field
        )
        if not samples:
            raise ModelPressError("dataset: no usable calibration samples (all empty?)")
        inputs = capture_first_layer_inputs(model, layers[0], samples, device)

    writer = ShardedSafetensorsWriter(out, max_shard_bytes, lambda name: to_checkpoint_name(name, layout)) if out is not None else None
    route_all_tokens(model, True)
    try:
        schemes, reports = run_pipeline(layers_prefix, layers, modifiers, plans, inputs, source, writer, device, progress)
    finally:
        route_all_tokens(model, False)  # an in-memory model goes back to routed inference

    outside_done = {}
    for modifier, plan in zip(modifiers, plans):
        mods = {n: model.get_submodule(n) for n in plan if not n.startswith(inside)}
        embeddings = model.get_input_embeddings().weight
        for module in mods.values():  # a head tied to the embeddings gets its own copy first
            if module.weight is embeddings:
                module.weight = torch.nn.Parameter(embeddings.data.clone(), requires_grad=False)
                config.tie_word_embeddings = False
        outside_done.update(modifier.apply(mods, {}, LayerState()))
    schemes.update({n: ql.scheme for n, ql in outside_done.items()})

    if out is not None and writer is not None:
        write_module(writer, "", model, outside_done, skip_prefix=inside)
        writer.close()
        _write_metadata(out, model, config, modifiers, schemes, model_dir, tokenizer, layout)
        _write_report(out, reports)
    if source is None:
        move_outside(model, inside, home)
    return OneshotResult(
        output_dir=out,
        quantized_modules=len(schemes),
        layers=reports,
        input_bytes=input_bytes,
        output_bytes=output_bytes(out) if out is not None else 0,
        seconds=time.monotonic() - start,
        model=model if source is None else None,
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_plans(modifiers: list[Modifier], plans: list[dict[str, Any]]) -> None:
    owners: dict[str, str] = {}
    for modifier, plan in zip(modifiers, plans):
        if not modifier.quantizes:
            continue
        for name in plan:
            if name in owners:
                raise ModelPressError(
                    f"recipe: {name} is quantized by both {owners[name]} and {type(modifier).__name__}; "
                    "narrow their targets or use ignore"
                )
            owners[name] = type(modifier).__name__


def _prepare_output(output_dir: str | Path | None) -> Path | None:
    if output_dir is None:
        return None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ModelPressError(f"output_dir: {out} is a file; give a directory")
    if out.is_dir() and any(out.glob("*.safetensors")):
        raise ModelPressError(f"output_dir: {out} already holds a model; choose an empty directory or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_metadata(
    out: Path,
    model: torch.nn.Module,
    config: Any,
    modifiers: list[Modifier],
    schemes: dict[str, QuantizationScheme],
    model_dir: Path | None,
    tokenizer: Any,
    layout: ExpertLayout | None,
) -> None:
    """config.json with its quantization_config, the recipe, tokenizer and generation config."""
    groups: dict[str, QuantizationScheme] = {}
    for modifier in modifiers:
        for name, scheme in getattr(modifier, "groups", {}).items():
            groups[name if name not in groups else f"{name}_{len(groups)}"] = scheme
    ignore = [to_checkpoint_name(n, layout) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in schemes]
    if schemes:
        config.quantization_config = quantization_config(groups, schemes, ignore)
    config.save_pretrained(out)
    (out / "recipe.yaml").write_text(recipe_yaml(modifiers))
    copy_aux_files(model_dir, out)
    if model_dir is None and tokenizer is not None:
        tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _write_report(out: Path, reports: list[LayerReport]) -> None:
    """Per-layer losses and achieved sparsity: the checkpoint format has no place for them, and
    pruned weights are stored dense, so this file is where a reader finds them."""
    layers = [
        {
            "layer": r.index,
            "seconds": round(r.seconds, 3),
            "sequential": r.sequential,
            "loss": r.losses,
            "sparsity": r.sparsity,
            "dampening_raised": r.dampening,
        }
        for r in reports
    ]
    total = [s for r in reports for s in r.sparsity.values()]
    summary = {"mean_sparsity": round(sum(total) / len(total), 6) if total else 0.0}
    (out / REPORT_FILE).write_text(json.dumps({**summary, "layers": layers}, indent=1) + "\n")

