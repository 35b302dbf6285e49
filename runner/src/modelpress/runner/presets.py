"""Preset + algorithm -> an llm-compressor recipe document (stages of modifier groups), as plain data.

The document names modifiers by their llm-compressor class names, so it reads the same as a recipe
YAML a user would write, and the engine's recipe parser turns it into modifier objects.
"""

from typing import Any

from modelpress.engine.errors import ModelPressError

# Each algorithm is a sequence of (stage, modifier, fixed arguments). Modifiers in QUANTIZERS also
# get the scheme and the ignore list; SparseGPT gets the ignore list (the head stays dense).
ALGORITHM_MODIFIERS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "RTN": [("quant", "QuantizationModifier", {})],
    "GPTQ": [("quant", "GPTQModifier", {})],
    "AWQ": [("quant", "AWQModifier", {}), ("quant", "QuantizationModifier", {})],  # AWQ scales, RTN quantizes
    "SmoothQuant+GPTQ": [("quant", "SmoothQuantModifier", {"smoothing_strength": 0.8}), ("quant", "GPTQModifier", {})],
    "SparseGPT+GPTQ": [
        ("sparsity", "SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "2:4"}),
        ("quant", "GPTQModifier", {}),
    ],
}
QUANTIZERS = {"QuantizationModifier", "GPTQModifier"}

# How vLLM 0.32 runs each preset's checkpoint: the quant type its compressed-tensors path reads and
# the kernel it picks (CPU: what the vllm tier measured; GPU: its weight-only and scaled-mm paths).
# What the 4-bit pair costs in quality is measured in bench/scales.json (README, "Scales and order").
SERVED_AS: dict[str, str] = {
    "W4A16": "uint4b8 (symmetric int4 groups, no zero points): CPUWNA16 on CPU, Marlin on GPU",
    "W4A16_ASYM": "uint4 with a zero point per group: CPUWNA16 on CPU, Marlin with zero points on GPU",
    "W8A16": "uint8b128: Marlin on GPU; vLLM's CPU build has no kernel for it",
    "W8A8": "int8 weights, dynamic per-token int8 activations: CPUInt8ScaledMM on CPU, CUTLASS scaled_mm on GPU",
    "INT8": "int8 weights, dynamic per-token int8 activations: CPUInt8ScaledMM on CPU, CUTLASS scaled_mm on GPU",
    "FP8": "fp8 weights and static fp8 activations: fp8 scaled_mm on GPU; vLLM's CPU build lacks static fp8 activations",
    "FP8_DYNAMIC": "fp8 per-channel weights, dynamic fp8 activations: ChannelWiseTorchFP8ScaledMM on CPU, fp8 scaled_mm on GPU",
}
IGNORE_TAKERS = QUANTIZERS | {"SparseGPTModifier"}


def preset_document(
    preset: str, algorithm: str, ignore: list[str], group_size: int | None = None, observer: str | None = None
) -> dict[str, Any]:
    """The recipe document for a preset scheme compressed by `algorithm`."""
    if algorithm not in ALGORITHM_MODIFIERS:
        raise ModelPressError(f"algorithm: {algorithm!r} is unknown; choose one of {', '.join(ALGORITHM_MODIFIERS)}")
    scheme = {"config_groups": {"group_0": grouped_scheme(preset, group_size)}} if group_size else {"scheme": preset}
    document: dict[str, Any] = {}
    for stage, name, fixed in ALGORITHM_MODIFIERS[algorithm]:
        args = dict(fixed)
        if name in QUANTIZERS:
            args.update(scheme)
            if observer:
                args["weight_observer"] = observer
        if name in IGNORE_TAKERS:
            args["ignore"] = list(ignore)
        document.setdefault(f"{stage}_stage", {}).setdefault(f"{stage}_modifiers", {})[name] = args
    return document


def grouped_scheme(preset: str, group_size: int) -> dict[str, Any]:
    """A grouped preset's scheme body with another group size (e.g. 64 where 128 does not divide)."""
    from modelpress.engine.schemes import resolve_scheme

    scheme = resolve_scheme(preset, ["Linear"])["group_0"]
    if scheme.weights is None or scheme.weights.group_size is None or scheme.weights.group_size <= 0:
        raise ModelPressError(f"group size: preset {preset} is not grouped; drop the group size")
    weights = scheme.weights.model_copy(update={"group_size": group_size})
    return scheme.model_copy(update={"weights": weights}).model_dump(mode="json", exclude_none=True)
