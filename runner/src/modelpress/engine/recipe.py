"""Recipes: modifier objects, or llm-compressor-style YAML (stages -> modifier groups -> modifiers).

YAML shape, as llm-compressor writes it:

    quant_stage:
      quant_modifiers:
        QuantizationModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head]}

Stages are flattened, in order, into one list of modifiers. A document is bounded
(`tree_problem`) before it is walked, and every way it can be wrong is a ModelPressError.
"""

from pathlib import Path
from typing import Any

import yaml

from modelpress.contract import key_shown, shown, tree_problem
from modelpress.engine.errors import ModelPressError
from modelpress.engine.awq import AWQModifier
from modelpress.engine.gptq import GPTQModifier
from modelpress.engine.modifier import Modifier
from modelpress.engine.rtn import QuantizationModifier
from modelpress.engine.smoothquant import SmoothQuantModifier
from modelpress.engine.sparsegpt import SparseGPTModifier
from modelpress.engine.spinquant import SpinQuantModifier

RecipeInput = Modifier | list[Modifier] | str | Path

# the modifiers a YAML recipe can name, by llm-compressor's class names
MODIFIERS: dict[str, type[Modifier]] = {
    cls.__name__: cls
    for cls in (QuantizationModifier, GPTQModifier, SparseGPTModifier, SmoothQuantModifier, AWQModifier, SpinQuantModifier)
}


def load_recipe(recipe: RecipeInput) -> list[Modifier]:
    """Accept a modifier, a list of them, YAML text, or a path to a YAML file."""
    if isinstance(recipe, Modifier):
        return [recipe]
    if isinstance(recipe, list):
        bad = [type(m).__name__ for m in recipe if not isinstance(m, Modifier)]
        if bad:
            raise ModelPressError(f"recipe: list items must be modifiers, got {bad}")
        if not recipe:
            raise ModelPressError("recipe: empty; give at least one modifier")
        return list(recipe)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml"))):
        path = Path(recipe)
        if not path.is_file():
            raise ModelPressError(f"recipe: file {path} not found")
        recipe = path.read_text(encoding="utf-8")
    if not isinstance(recipe, str):
        raise ModelPressError(f"recipe: unsupported type {type(recipe).__name__}")
    try:
        document = yaml.safe_load(recipe)
    except (yaml.YAMLError, RecursionError) as err:
        raise ModelPressError(f"recipe: not valid YAML ({str(err).splitlines()[0] if str(err) else 'nested too deeply'})") from None
    return parse_recipe(document)


def parse_recipe(document: Any) -> list[Modifier]:
    """The modifiers of a parsed YAML document, stages flattened in order."""
    problem = tree_problem(document)
    if problem is not None:
        raise ModelPressError(f"recipe: {problem}")
    if not isinstance(document, dict):
        raise ModelPressError("recipe: expected a mapping of stages (e.g. quant_stage: {quant_modifiers: {...}})")
    modifiers: list[Modifier] = []
    for stage_name, stage in document.items():
        where = key_shown(stage_name)
        if stage_name == "args":
            continue
        if where.endswith("_modifiers"):  # a group given without a stage around it
            modifiers += _parse_group(where, stage)
            continue
        if not where.endswith("_stage") or not isinstance(stage, dict):
            raise ModelPressError(f"recipe.{where}: expected a '<name>_stage' mapping of '<name>_modifiers' groups")
        for group_name, group in stage.items():
            if not key_shown(group_name).endswith("_modifiers"):
                raise ModelPressError(f"recipe.{where}.{key_shown(group_name)}: keys in a stage end in '_modifiers'")
            modifiers += _parse_group(f"{where}.{key_shown(group_name)}", group)
    if not modifiers:
        raise ModelPressError("recipe: no modifiers found")
    return modifiers


def _parse_group(where: str, group: Any) -> list[Modifier]:
    if not isinstance(group, dict):
        raise ModelPressError(f"recipe.{where}: expected a mapping of ModifierName: {{arguments}}")
    modifiers = []
    for name, kwargs in group.items():
        if name not in MODIFIERS:
            raise ModelPressError(f"recipe.{where}: unknown modifier {shown(name)}; valid modifiers: {', '.join(MODIFIERS)}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ModelPressError(f"recipe.{where}.{name}: arguments must be a mapping")
        kwargs = dict(kwargs or {})
        odd = [k for k in kwargs if not isinstance(k, str)]
        if odd:
            raise ModelPressError(f"recipe.{where}.{name}: argument names must be text, not {shown(odd[0])}")
        if name == "AWQModifier" and ("scheme" in kwargs or "config_groups" in kwargs):
            modifiers += _split_awq(kwargs)
            continue
        modifiers.append(MODIFIERS[name](**kwargs))
    return modifiers


def _split_awq(kwargs: dict[str, Any]) -> list[Modifier]:
    """An AWQModifier that carries its own scheme (llm-compressor before 0.11) becomes the pair
    it means today: AWQModifier scaling, then a QuantizationModifier with that scheme."""
    moved = ("scheme", "config_groups", "targets", "ignore", "kv_cache_scheme", "bypass_divisibility_checks")
    quant = {k: kwargs.pop(k) for k in moved if k in kwargs}
    return [MODIFIERS["AWQModifier"](**kwargs), MODIFIERS["QuantizationModifier"](**quant)]


def recipe_yaml(modifiers: list[Modifier]) -> str:
    """The applied recipe in llm-compressor's YAML dialect (one class per modifier group)."""
    groups: list[dict[str, Any]] = []
    for modifier in modifiers:
        name = type(modifier).__name__
        if not groups or name in groups[-1]:
            groups.append({})
        groups[-1][name] = modifier.model_dump(mode="json", exclude_defaults=True)
    stage = {f"quant{'' if i == 0 else f'_{i}'}_modifiers": g for i, g in enumerate(groups)}
    return yaml.safe_dump({"quant_stage": stage}, sort_keys=False)
