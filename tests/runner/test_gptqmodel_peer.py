"""bench/peers/gptqmodel_run.py's pure half: our recipe mapped to GPTQModel's QuantizeConfig, its refusals, the grid check.

The driver runs under GPTQModel's interpreter; its mapping and check import no gptqmodel, so the
file is loaded here by path and they are tested without GPTQModel installed.
"""

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from support.models import REPO

RECIPES = REPO / "bench" / "recipes"


def _driver() -> Any:
    spec = importlib.util.spec_from_file_location("gptqmodel_run", REPO / "bench" / "peers" / "gptqmodel_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DRIVER = _driver()


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / name).read_text())


def _gptq_args(document: dict[str, Any]) -> dict[str, Any]:
    return document["quant_stage"]["quant_modifiers"]["GPTQModifier"]


def test_group_aware_recipe_maps_to_gar_with_our_dampening() -> None:
    fields = DRIVER.quantize_config_fields(_recipe("gptq_w4a16_sym_g64_group_aware.yaml"))
    assert fields["bits"] == 4 and fields["group_size"] == 64 and fields["sym"] is True
    assert fields["act_group_aware"] is True and fields["desc_act"] is False and fields["static_groups"] is False
    assert fields["damp_percent"] == 0.01  # ours, not GPTQModel's default 0.05
    assert fields["fallback"] is None
    assert DRIVER.quantize_config_fields(_recipe("gptq_w4a16_asym_g64_group_aware.yaml"))["sym"] is False


def test_static_actorder_is_desc_act_with_static_groups() -> None:
    """Our default order (no actorder field) keeps natural-order groups: desc_act needs static_groups for that."""
    fields = DRIVER.quantize_config_fields(_recipe("gptq_w4a16_g64.yaml"))
    assert fields["desc_act"] is True and fields["static_groups"] is True and fields["act_group_aware"] is False
    document = _recipe("gptq_w4a16_g64.yaml")
    _gptq_args(document)["dampening_frac"] = 0.05
    assert DRIVER.quantize_config_fields(document)["damp_percent"] == 0.05


def test_per_channel_is_group_size_minus_one_in_activation_order() -> None:
    fields = DRIVER.quantize_config_fields(_recipe("gptq_w4a16_asym_ch.yaml"))
    assert fields["group_size"] == -1 and fields["sym"] is False
    assert fields["desc_act"] is True and fields["static_groups"] is False and fields["act_group_aware"] is False


def test_float_target_is_gptaq_with_the_same_alpha() -> None:
    fields = DRIVER.quantize_config_fields(_recipe("gptq_w4a16_asym_g64_float.yaml"))
    assert fields["gptaq"] == {"alpha": 0.5, "device": "cpu"} and fields["sym"] is False
    assert "gptaq" not in DRIVER.quantize_config_fields(_recipe("gptq_w4a16_asym_g64.yaml"))
    document = _recipe("gptq_w4a16_asym_g64_float.yaml")
    _gptq_args(document)["float_target"] = 2
    with pytest.raises(DRIVER.RecipeError, match="GPTQModifier.float_target: 2; give a number from 0 to 1"):
        DRIVER.quantize_config_fields(document)


def test_awq_with_clipping_maps_to_gptqmodels_awq() -> None:
    """GPTQModel's AWQ always clips and searches on its fixed grids; ours with apply_clip and the defaults is its equal."""
    fields = DRIVER.quantize_config_fields(_recipe("awq_clip_w4a16_asym_g64.yaml"))
    assert fields == {"method": "awq", "format": "gemm", "bits": 4, "group_size": 64, "sym": False, "fallback": None,
                      "offload_to_disk": False}
    assert DRIVER.quantize_config_fields(_recipe("awq_clip_w4a16_g64.yaml"))["sym"] is True
    document = _awq_changed(("n_grid",), 20)  # our defaults, spelled out, are still its values
    assert DRIVER.quantize_config_fields(document)["method"] == "awq"


def _changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(_recipe("gptq_w4a16_sym_g64_group_aware.yaml"))
    node = _gptq_args(document)
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


WEIGHTS = ("config_groups", "group_0", "weights")
AWQ_WEIGHTS = ("QuantizationModifier", *WEIGHTS)


def _awq_changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """The asymmetric AWQ-with-clipping recipe with one field set; a path from QuantizationModifier
    changes that modifier, any other the AWQModifier."""
    document = copy.deepcopy(_recipe("awq_clip_w4a16_asym_g64.yaml"))
    modifiers = document["quant_stage"]["quant_modifiers"]
    node = modifiers["QuantizationModifier"] if path[0] == "QuantizationModifier" else modifiers["AWQModifier"]
    path = path[1:] if path[0] == "QuantizationModifier" else path
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (_changed(("actorder",), None), "GPTQModifier.actorder"),
        (_changed(("actorder",), "group"), "GPTQModifier.actorder"),
        (_changed(("dampening_frac",), 0), "GPTQModifier.dampening_frac"),
        (_changed(("offload_hessians",), True), "GPTQModifier.offload_hessians"),
        (_changed(("ignore",), []), "GPTQModifier.ignore"),
        (_changed((*WEIGHTS, "observer"), "mse"), "weights.observer"),
        (_changed((*WEIGHTS, "strategy"), "channel"), "GPTQModifier.actorder"),
        (_changed((*WEIGHTS, "strategy"), "tensor"), "weights.strategy"),
        (_changed((*WEIGHTS, "group_size"), 0), "weights.group_size"),
        (_awq_changed((*AWQ_WEIGHTS, "strategy"), "channel"), "weights.strategy"),
        (_changed((*WEIGHTS, "num_bits"), 5), "weights.num_bits"),
        (_changed((*WEIGHTS, "type"), "float"), "weights.type"),
        (_changed(("config_groups", "group_0", "input_activations"), {"num_bits": 8}), "input_activations"),
        (_recipe("gptq_w8a8.yaml"), "GPTQModifier.scheme"),
        (_recipe("awq_w4a16_g64.yaml"), "AWQModifier.apply_clip"),
        (_awq_changed(("mappings",), [["re:.*q_proj"], "re:.*input_layernorm"]), "AWQModifier.mappings"),
        (_awq_changed(("n_grid",), 10), "AWQModifier.n_grid"),
        (_awq_changed(("duo_scaling",), False), "AWQModifier.duo_scaling"),
        (_awq_changed(("clip_max_shrink",), 0.3), "AWQModifier.clip_max_shrink"),
        (_awq_changed(("smoothing_strength",), 0.5), "AWQModifier.smoothing_strength"),
        (_awq_changed((*AWQ_WEIGHTS, "num_bits"), 8), "weights.num_bits"),
        (_awq_changed((*AWQ_WEIGHTS, "observer"), "mse"), "weights.observer"),
        (_awq_changed(("QuantizationModifier", "ignore"), []), "QuantizationModifier.ignore"),
        (_recipe("rtn_w4a16_g64.yaml"), "recipe: modifiers"),
        (_recipe("sparsegpt_2of4_gptq_w4a16_g64.yaml"), "recipe: modifiers"),
        (["GPTQModifier"], "recipe:"),
    ],
)
def test_recipes_without_an_equal_are_refused_naming_the_field(document: Any, field: str) -> None:
    with pytest.raises(DRIVER.RecipeError, match=field) as err:
        DRIVER.quantize_config_fields(document)
    assert "\n" not in str(err.value)


def _on_grid(bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight built as (q - z) × s per group of 4 columns, with its scale, zero and group index."""
    gen = torch.Generator().manual_seed(0)
    rows, cols, size = 6, 12, 4
    top = 2**bits - 1
    scale = torch.rand(rows, cols // size, generator=gen) + 0.01
    zero = torch.full_like(scale, (top + 1) // 2) if sym else torch.randint(0, top + 1, scale.shape, generator=gen).float()
    g_idx = torch.arange(cols, dtype=torch.int32) // size
    codes = torch.randint(0, top + 1, (rows, cols), generator=gen).float()
    return (codes - zero[:, g_idx.long()]) * scale[:, g_idx.long()], scale, zero, g_idx


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, False)])
def test_grid_check_accepts_a_weight_on_its_grid(bits: int, sym: bool) -> None:
    assert DRIVER.grid_error(*_on_grid(bits, sym), bits) is None


def test_grid_check_catches_a_weight_off_its_grid() -> None:
    weight, scale, zero, g_idx = _on_grid(4, True)
    nudged = weight.clone()
    nudged[2, 5] += 0.3 * scale[2, 1]
    assert "off the grid" in DRIVER.grid_error(nudged, scale, zero, g_idx, 4)
    beyond = weight.clone()
    beyond[0, 0] = (15 + 1 - zero[0, 0]) * scale[0, 0]  # code 16: on the step lattice, outside 4 bits
    assert "outside [0, 15]" in DRIVER.grid_error(beyond, scale, zero, g_idx, 4)
    assert DRIVER.grid_error(torch.randn(6, 12), scale, zero, g_idx, 4) is not None  # a float weight
    assert "zero point" in DRIVER.grid_error(weight, scale, zero + 0.5, g_idx, 4)
    assert "shapes" in DRIVER.grid_error(weight, scale, zero, g_idx[:-1], 4)


def test_the_matrix_gives_gptqmodel_exactly_the_recipes_it_maps() -> None:
    """compare_bench's Recipe.peers and the driver agree: a recipe sent to GPTQModel maps, one kept from it would be refused."""
    sys.path.insert(0, str(REPO / "bench"))
    import compare_bench

    for recipe in compare_bench.MATRIX:
        document = yaml.safe_load(recipe.ours.read_text())
        if recipe.for_peer("gptqmodel") is None:
            with pytest.raises(DRIVER.RecipeError):
                DRIVER.quantize_config_fields(document)
        else:
            assert DRIVER.quantize_config_fields(document)["bits"] == 4, recipe.name
