"""One GPTQModel quantization on token windows from a file, written as a dense checkpoint of its dequantized weights.

    VENV/bin/python bench/peers/gptqmodel_run.py --model DIR --recipe FILE.yaml \
        --windows windows.json --output DIR --report report.json

Run by GPTQModel's own interpreter (the venv `make bench-compare` builds as .venv-gptqmodel); it
imports gptqmodel and never the project. The recipe is ours: one GPTQModifier, or an AWQModifier
with the QuantizationModifier after it, with integer weight-only group quantization, mapped to
GPTQModel's QuantizeConfig by `quantize_config_fields`;
anything it has no equal for is refused with a one-line error. The windows (bench/held_out.py)
go in as token ids, all of them, in file order: no sorting, no concatenation, no truncation.

GPTQModel packs its result into its own kernel format, which our perplexity code does not read.
What it packs is taken just before packing: each Linear's reconstructed weight with the scales,
zero points and group index it found. The output is the float model with each quantized Linear's
weight replaced by that reconstruction (and, after AWQ, each norm by the one AWQ divided by its
scales; float32 safetensors, config, tokenizer), checked to sit on its `bits`-bit grid per group,
so the caller scores it like any other checkpoint.

The functions above `main` are pure (no gptqmodel import), for the tests to load this file by path.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

STARTED = time.monotonic()

# our defaults where the recipe leaves a field out (engine/gptq.py's GPTQModifier, compressed-tensors' args)
DAMPENING_FRAC = 0.01
ACTORDER = "static"
BITS = (2, 3, 4, 8)  # the integer widths GPTQModel packs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class RecipeError(ValueError):
    """A recipe GPTQModel has no equal for; the message names the field and the fix."""


def _modifiers(document: Any) -> list[tuple[str, dict[str, Any]]]:
    """The recipe's modifiers in order, each with its arguments."""
    if not isinstance(document, dict):
        raise RecipeError("recipe: expected a mapping of stages (quant_stage: {quant_modifiers: {GPTQModifier: ...}})")
    modifiers: list[tuple[str, dict[str, Any]]] = []
    for stage_name, stage in document.items():
        groups = {stage_name: stage} if str(stage_name).endswith("_modifiers") else stage
        if not isinstance(groups, dict):
            raise RecipeError(f"recipe.{stage_name}: expected a mapping of '<name>_modifiers' groups")
        for group_name, group in groups.items():
            if not isinstance(group, dict):
                raise RecipeError(f"recipe.{stage_name}.{group_name}: expected a mapping of modifiers")
            for name, args in group.items():
                if not isinstance(args or {}, dict):
                    raise RecipeError(f"recipe.{name}: expected a mapping of its arguments")
                modifiers.append((name, args or {}))
    return modifiers


def _weights(modifier: str, args: dict[str, Any], allowed: set[str], bits: tuple[int, ...], strategies: tuple[str, ...]) -> dict[str, Any]:
    """The one config group's weight arguments, refused unless GPTQModel quantizes the same Linears."""
    unknown = set(args) - allowed - {"ignore", "config_groups", "targets"}
    if unknown:
        raise RecipeError(f"{modifier}.{sorted(unknown)[0]}: not mapped to GPTQModel; remove it to compare with it")
    if set(args.get("ignore") or []) - {"lm_head"} or "lm_head" not in (args.get("ignore") or []):
        raise RecipeError(f"{modifier}.ignore: give [lm_head]; GPTQModel quantizes every decoder Linear and never the head")
    groups = args.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise RecipeError(f"{modifier}.config_groups: give exactly one group; GPTQModel quantizes all Linears one way")
    (group,) = groups.values()
    if not isinstance(group, dict) or group.get("targets") != ["Linear"]:
        raise RecipeError(f"{modifier}.config_groups.targets: give [Linear]; GPTQModel quantizes every decoder Linear")
    if group.get("input_activations") or group.get("output_activations"):
        raise RecipeError(f"{modifier}.config_groups.input_activations: remove it; the GPTQModel peer is weight-only")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise RecipeError(f"{modifier}.config_groups.weights: missing; give num_bits, symmetric, strategy: group, group_size")
    unknown = set(weights) - {"num_bits", "type", "symmetric", "strategy", "group_size", "observer", "actorder"}
    if unknown:
        raise RecipeError(f"weights.{sorted(unknown)[0]}: not mapped to GPTQModel; remove it to compare with it")
    if weights.get("type", "int") != "int":
        raise RecipeError(f"weights.type: {weights['type']!r}; the GPTQModel peer quantizes to integers, give int")
    if weights.get("num_bits") not in bits:
        raise RecipeError(f"weights.num_bits: {weights.get('num_bits')!r}; give one of {list(bits)}")
    if weights.get("strategy") not in strategies:
        raise RecipeError(f"weights.strategy: {weights.get('strategy')!r}; the peer maps {' or '.join(strategies)}")
    if weights["strategy"] == "group" and (not isinstance(weights.get("group_size"), int) or weights["group_size"] < 1):
        raise RecipeError("weights.group_size: give a positive group size with strategy: group")
    if weights.get("observer", "minmax") != "minmax":
        raise RecipeError(f"weights.observer: {weights['observer']!r}; GPTQModel's scales are min-max, give minmax")
    return weights


def quantize_config_fields(document: Any) -> dict[str, Any]:
    """GPTQModel QuantizeConfig arguments equal to our recipe `document` (parsed YAML): one
    GPTQModifier (`_gptq_fields`), or an AWQModifier then the QuantizationModifier that quantizes
    what it scaled (`_awq_fields`)."""
    modifiers = _modifiers(document)
    names = [name for name, _ in modifiers]
    if names == ["GPTQModifier"]:
        return _gptq_fields(modifiers[0][1])
    if names == ["AWQModifier", "QuantizationModifier"]:
        return _awq_fields(modifiers[0][1], modifiers[1][1])
    raise RecipeError(f"recipe: modifiers {names}; the GPTQModel peer runs one GPTQModifier, or AWQModifier then QuantizationModifier")


def _gptq_fields(args: dict[str, Any]) -> dict[str, Any]:
    """GPTQModifier's arguments as GPTQModel's GPTQ.

    actorder "static" (ours, the default) visits columns by descending Hessian diagonal with group
    scales observed up front on the whole weight: GPTQModel's desc_act with static_groups (without
    static_groups its groups follow the permuted order, a g_idx layout we do not store). "group_aware"
    is GPTQModel's act_group_aware (GAR) with desc_act off. Per channel is its group_size -1, whose one
    scale per row it observes on the whole weight before the sweep, as static order does ours.

    Dampening is equal: we add dampening_frac × mean(diag H) to H's diagonal after giving dead columns
    (zero diagonal) a unit one (second_order.inverse_hessian); GPTQModel adds damp_percent × the mean
    of the same diagonal, its dead columns also set to one first (quantizer._neutralize_dead_columns),
    so damp_percent = dampening_frac (its own default, 0.05, is not ours). The two differ only when
    Cholesky fails: we raise the fraction tenfold, it adds damp_auto_increment, left at its default.
    block_size is the lazy-batch width of the sweep, which changes the order of float sums, not the
    result, and is not mapped. The low-sample fallback (RTN for Linears calibration barely reaches)
    is off, so every Linear is solved by GPTQ as ours are.
    """
    weights = _weights("GPTQModifier", args, {"dampening_frac", "actorder", "block_size", "float_target"}, BITS, ("group", "channel"))
    actorder = args.get("actorder", ACTORDER)
    if actorder not in ("static", "group_aware"):
        raise RecipeError(f"GPTQModifier.actorder: {actorder!r}; the GPTQModel peer maps static or group_aware")
    frac = args.get("dampening_frac", DAMPENING_FRAC)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise RecipeError(f"GPTQModifier.dampening_frac: {frac!r}; GPTQModel's damp_percent needs 0 < value < 1")
    toward_float = args.get("float_target", 0.0)
    if not isinstance(toward_float, (int, float)) or not 0 <= toward_float <= 1:
        raise RecipeError(f"GPTQModifier.float_target: {toward_float!r}; give a number from 0 to 1")
    per_channel = weights["strategy"] == "channel"
    if per_channel and actorder == "group_aware":
        raise RecipeError("GPTQModifier.actorder: group_aware needs strategy: group (GPTQModel's GAR orders groups)")
    return {
        **({"gptaq": {"alpha": float(toward_float), "device": "cpu"}} if toward_float else {}),
        "bits": weights["num_bits"],
        "group_size": -1 if per_channel else weights["group_size"],
        "sym": bool(weights.get("symmetric", True)),
        "desc_act": actorder == "static",
        "static_groups": actorder == "static" and not per_channel,
        "act_group_aware": actorder == "group_aware",
        "damp_percent": float(frac),
        "fallback": None,
        "offload_to_disk": False,
    }


# GPTQModel's AWQ (looper/awq_processor.py) has no knobs for its search: these are its fixed values
AWQ_FIXED = {"apply_clip": True, "duo_scaling": True, "n_grid": 20, "clip_n_grid": 20, "clip_max_shrink": 0.5}


def _awq_fields(awq: dict[str, Any], quantization: dict[str, Any]) -> dict[str, Any]:
    """AWQModifier + QuantizationModifier as GPTQModel's AWQ.

    GPTQModel always searches the scales on a grid of 20 ratios with both activation and weight
    magnitudes (duo scaling), then clips every Linear but q/k on 20 steps down to half the range,
    and it maps each model family's norms and Linears itself. So our recipe is its equal only with
    apply_clip on, the rest of our search at its defaults, and no mappings of its own. Its int4
    GEMM layout is the one it quantizes AWQ for. The low-sample fallback (RTN where calibration
    barely reaches) is off, as for GPTQ.
    """
    if "mappings" in awq:
        raise RecipeError("AWQModifier.mappings: GPTQModel maps each model family's norms and Linears itself; remove it")
    unknown = set(awq) - set(AWQ_FIXED) - {"offload_device"}
    if unknown:
        raise RecipeError(f"AWQModifier.{sorted(unknown)[0]}: not mapped to GPTQModel; remove it to compare with it")
    for field, value in AWQ_FIXED.items():
        given = awq.get(field, False if field == "apply_clip" else value)
        if given != value:
            raise RecipeError(f"AWQModifier.{field}: {given!r}; GPTQModel's AWQ always uses {value!r}, give that")
    weights = _weights("QuantizationModifier", quantization, set(), (4,), ("group",))
    return {
        "method": "awq",
        "format": "gemm",
        "bits": weights["num_bits"],
        "group_size": weights["group_size"],
        "sym": bool(weights.get("symmetric", True)),
        "fallback": None,
        "offload_to_disk": False,
    }


def grid_error(weight: Any, scale: Any, zero: Any, g_idx: Any, bits: int) -> str | None:
    """Why `weight` [out, in] is not on its `bits`-bit grid, or None when every entry is.

    Entry (r, c) must be (q - z) × s for an integer q in [0, 2^bits - 1], with s = scale[r, g] and an
    integer z = zero[r, g] in the same range, g = g_idx[c] (scale, zero: [out, groups]).
    """
    import torch

    top = 2**bits - 1
    if scale.shape != zero.shape or scale.shape[0] != weight.shape[0] or g_idx.shape != (weight.shape[1],):
        return f"shapes: weight {tuple(weight.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}, g_idx {tuple(g_idx.shape)}"
    if bool((scale <= 0).any()):
        return "a scale is not positive"
    if bool(((zero - zero.round()).abs() > 1e-6).any()) or bool(((zero < 0) | (zero > top)).any()):
        return f"a zero point is not an integer in [0, {top}]"
    s, z = scale.double()[:, g_idx.long()], zero.double()[:, g_idx.long()]
    code = weight.double() / s + z
    off = float((code - code.round()).abs().max())
    if off > 1e-3:
        return f"an entry is {off:.3f} of a step off the grid"
    if bool(((code.round() < 0) | (code.round() > top)).any()):
        return f"a code is outside [0, {top}]"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory (safetensors, config, tokenizer)")
    parser.add_argument("--recipe", type=Path, required=True, help="a ModelPress YAML recipe with one GPTQModifier")
    parser.add_argument("--windows", type=Path, required=True, help="JSON with input_ids: a list of token-id lists")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()

    import yaml

    try:
        fields = quantize_config_fields(yaml.safe_load(args.recipe.read_text()))
    except RecipeError as err:
        raise SystemExit(f"--recipe {args.recipe.name}: {err}") from None

    # The packed form is thrown away: its C++ packer, compiled on first use, would only add minutes.
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    # Its CPU pool defaults to half the cores: one on two, fewer than the two its model loader's pool asks for.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    import torch
    from driver_report import write_report  # beside this file
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper.awq_processor import AWQProcessor
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from transformers import AutoModelForCausalLM

    windows = json.loads(args.windows.read_text())["input_ids"]
    awq = fields.get("method") == "awq"
    processor = AWQProcessor if awq else GPTQProcessor
    captured: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    pack = processor.submodule_finalize

    def capture(self: Any, module: Any, model: Any, **kwargs: Any) -> Any:
        """What GPTQ or AWQ reconstructed, taken before it is packed into GPTQModel's kernel format."""
        module.stream_sync()
        state, weight = module.state, module.weight.data
        # AWQ keeps no group index: its groups (the only strategy it maps) are the natural column runs
        g_idx = torch.arange(weight.shape[1], dtype=torch.int32) // fields["group_size"] if awq else state["q_g_idx"].clone()
        captured[module.full_name] = (weight.detach().float().clone(), state["q_scales"].float().clone(),
                                      state["q_zeros"].float().clone(), g_idx)
        # AWQ's torch packer takes only float16 and bfloat16 weights, and the packed form is thrown away
        return None if awq else pack(self, module, model, **kwargs)

    processor.submodule_finalize = capture
    imported = time.monotonic()
    model = GPTQModel.load(str(args.model), QuantizeConfig(**fields), device="cpu", dtype=torch.float32)
    model.quantize([{"input_ids": w} for w in windows], calibration_sort=None, batch_size=1)
    done = time.monotonic()

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    linears = {name for name, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    if set(captured) != linears:
        raise SystemExit(f"GPTQModel quantized {len(captured)} Linears, the model has {len(linears)}: "
                         f"missing {sorted(linears - set(captured))[:3]}, extra {sorted(set(captured) - linears)[:3]}")
    if awq:  # AWQ divided each norm by the scales it multiplied into the Linears after it
        theirs = model.model.state_dict()
        scaled = 0
        for name, param in dense.named_parameters():
            if name.rsplit(".", 1)[0] in captured:
                continue
            if name not in theirs or theirs[name].shape != param.shape:
                raise SystemExit(f"GPTQModel's AWQ model has no {name} of shape {tuple(param.shape)}")
            scaled += not torch.equal(theirs[name].float(), param.data)
            param.data.copy_(theirs[name])
        if not scaled:
            raise SystemExit("GPTQModel's AWQ changed no norm: its scales were not applied")
    for name, (weight, scale, zero, g_idx) in captured.items():
        problem = grid_error(weight, scale, zero, g_idx, fields["bits"])
        assert problem is None, f"{name}: GPTQModel's weight is not on its {fields['bits']}-bit grid ({problem})"
        target = dense.get_submodule(name).weight
        assert weight.shape == target.shape, f"{name}: {tuple(weight.shape)} for a {tuple(target.shape)} weight"
        target.data.copy_(weight)
    args.output.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(args.output, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.model / name).is_file():
            shutil.copy2(args.model / name, args.output / name)
    write_report(args.report, "gptqmodel", ("gptqmodel", "transformers", "torch"), STARTED, imported, done,
                 quantize_config={k: v for k, v in fields.items() if v is not None}, linears=len(captured))


if __name__ == "__main__":
    main()
