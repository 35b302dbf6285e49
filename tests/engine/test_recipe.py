"""Recipes: objects, lists and llm-compressor YAML; clear errors for unknown names."""

from pathlib import Path

import pytest
import yaml

from modelpress import ModelPressError, QuantizationModifier, load_recipe
from modelpress.engine.recipe import recipe_yaml

YAML = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      scheme: W4A16_ASYM
      targets: [Linear]
      ignore: [lm_head]
"""


def test_yaml_string_file_objects_and_lists(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(YAML)
    for recipe in (YAML, tmp_path / "r.yaml", str(tmp_path / "r.yaml")):
        (modifier,) = load_recipe(recipe)
        assert isinstance(modifier, QuantizationModifier)
        assert modifier.ignore == ["lm_head"] and modifier.groups["group_0"].weights.symmetric is False
    m = QuantizationModifier(scheme="W8A8")
    assert load_recipe(m) == [m] and load_recipe([m, m]) == [m, m]


def test_round_trip_through_yaml() -> None:
    modifiers = [QuantizationModifier(scheme="W8A16", ignore=["lm_head"]), QuantizationModifier(scheme="FP8_DYNAMIC", targets=["re:.*down_proj$"])]
    text = recipe_yaml(modifiers)
    stage = yaml.safe_load(text)["quant_stage"]
    assert list(stage) == ["quant_modifiers", "quant_1_modifiers"]  # one class per group, as llm-compressor requires
    again = load_recipe(text)
    assert [m.model_dump() for m in again] == [m.model_dump() for m in modifiers]


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("quant_stage:\n  quant_modifiers:\n    GPTQModifierX: {}\n", "unknown modifier 'GPTQModifierX'; valid modifiers: QuantizationModifier"),
        ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W4A16, group: 64}\n", "unknown argument 'group'; valid arguments: config_groups, scheme"),
        ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W3A99}\n", "unknown preset 'W3A99'"),
        ("quant_stage:\n  foo: {}\n", "end in '_modifiers'"),
        ("[1, 2", "not valid YAML"),
        ("missing.yaml", "file missing.yaml not found"),
    ],
)
def test_bad_recipes_name_the_problem(recipe: str, expected: str) -> None:
    with pytest.raises(ModelPressError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(recipe)


def test_unsupported_scheme_details_are_refused() -> None:
    with pytest.raises(ModelPressError, match="asymmetric 8-bit weight-only"):
        QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "symmetric": False, "strategy": "channel"}}})
    with pytest.raises(ModelPressError, match="3-bit"):
        QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 3, "strategy": "channel"}}})
    with pytest.raises(ModelPressError, match="kv_cache_scheme"):
        QuantizationModifier(scheme="W8A8", kv_cache_scheme={"num_bits": 8})
