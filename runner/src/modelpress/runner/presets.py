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
