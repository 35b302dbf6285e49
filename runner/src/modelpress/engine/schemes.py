"""Quantization schemes: presets and explicit config groups, resolved to compressed-tensors models.

Presets change meaning across compressed-tensors releases, so a preset name is resolved once, here,
into explicit QuantizationArgs; the checkpoint records those, never the bare name.
"""

from typing import Any

import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
    is_preset_scheme,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from pydantic import ValidationError

from modelpress.contract import PRESETS, shown
from modelpress.engine.errors import ModelPressError

SUPPORTED_PRESETS = PRESETS  # the CompressionJob's list, so the spec and the engine accept the same names
SchemeInput = str | dict[str, Any] | QuantizationScheme


def resolve_scheme(scheme: SchemeInput, targets: list[str]) -> dict[str, QuantizationScheme]:
    """Turn a modifier's `scheme` (preset name, `{PRESET: targets}`, or a scheme body) into groups."""
    if isinstance(scheme, QuantizationScheme):
        return {"group_0": scheme}
    if isinstance(scheme, str):
        return {"group_0": _preset(scheme, targets)}
    if not isinstance(scheme, dict):
        raise ModelPressError(f"scheme: expected a preset name or a mapping, got {type(scheme).__name__}")
    if scheme and all(isinstance(k, str) and is_preset_scheme(k) for k in scheme):
        return {
            f"group_{i}": _preset(name, _as_list(group_targets, f"scheme.{name}"))
            for i, (name, group_targets) in enumerate(scheme.items())
        }
    return {"group_0": _parse_scheme({"targets": targets, **scheme}, "scheme")}


def resolve_config_groups(config_groups: dict[str, Any]) -> dict[str, QuantizationScheme]:
    """Explicit groups, as in a checkpoint's `config_groups` (each with its own `targets`)."""
    groups = {}
    for name, body in config_groups.items():
        if isinstance(body, QuantizationScheme):
            groups[name] = body
        elif isinstance(body, dict):
            if "targets" not in body:
                raise ModelPressError(f"config_groups.{name}.targets: missing; list the modules, e.g. ['Linear']")
            groups[name] = _parse_scheme(body, f"config_groups.{name}")
        else:
            raise ModelPressError(f"config_groups.{name}: expected a mapping, got {type(body).__name__}")
    return groups


def compression_format(scheme: QuantizationScheme) -> CompressionFormat:
    """The on-disk format vLLM expects for this scheme (pack-, int- or float-quantized)."""
    if scheme.format is not None:
        return CompressionFormat(scheme.format)
    return infer_module_format(torch.nn.Linear, scheme)


def check_supported(scheme: QuantizationScheme, where: str) -> None:
    """Refuse schemes the engine cannot write in a form vLLM reads, before any work starts."""
    w, a = scheme.weights, scheme.input_activations
    if w is None:
        raise ModelPressError(f"{where}.weights: missing; weight quantization is required")
    if scheme.output_activations is not None:
        raise ModelPressError(f"{where}.output_activations: not supported; remove it")
    if w.type == QuantizationType.INT and w.num_bits not in (4, 8):
        raise ModelPressError(f"{where}.weights.num_bits: {w.num_bits}-bit integers are not read by vLLM; use 4 or 8")
    if w.type == QuantizationType.FLOAT and w.num_bits != 8:
        raise ModelPressError(f"{where}.weights.num_bits: only 8-bit floats (FP8) are supported")
    if w.strategy not in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        raise ModelPressError(f"{where}.weights.strategy: {w.strategy} is not supported; use tensor, channel or group")
    if w.dynamic:
        raise ModelPressError(f"{where}.weights.dynamic: weights must be static")
    if w.type == QuantizationType.INT and w.num_bits == 8 and not w.symmetric and a is None:
        raise ModelPressError(f"{where}.weights.symmetric: vLLM has no kernel for asymmetric 8-bit weight-only; use symmetric")
    if a is not None:
        if a.dynamic and a.strategy != QuantizationStrategy.TOKEN:
            raise ModelPressError(f"{where}.input_activations.strategy: dynamic activations must be per token")
        if not a.dynamic and a.strategy != QuantizationStrategy.TENSOR:
            raise ModelPressError(f"{where}.input_activations.strategy: static activations must be per tensor")


def needs_calibration(scheme: QuantizationScheme) -> bool:
    """Static activation scales are observed on data; everything else here is data-free."""
    a = scheme.input_activations
    return a is not None and not a.dynamic


def _preset(name: str, targets: list[str]) -> QuantizationScheme:
    if name.upper() not in SUPPORTED_PRESETS:
        known = ", ".join(SUPPORTED_PRESETS)
        hint = " (a compressed-tensors preset this engine does not write yet)" if name.upper() in PRESET_SCHEMES else ""
        raise ModelPressError(f"scheme: unknown preset {shown(name)}{hint}; choose one of {known} or give config_groups")
    return preset_name_to_scheme(name, targets)


def _parse_scheme(body: dict[str, Any], where: str) -> QuantizationScheme:
    try:
        return QuantizationScheme.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ModelPressError(f"{where}.{field}: {first['msg']}") from None
    except (ValueError, NotImplementedError) as err:
        raise ModelPressError(f"{where}: {err}") from None


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ModelPressError(f"{where}: expected a list of target names")
