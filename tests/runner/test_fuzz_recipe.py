"""Property tests of the recipe parser: any tree or text gives modifiers or a ModelPressError, and
never repeats a secret-shaped value back.

Bounded and derandomized (support.fuzz); the tier's last lines say how many examples were tried.
"""

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from modelpress.contract import secret_like
from modelpress.engine.errors import ModelPressError
from modelpress.engine.recipe import MODIFIERS, load_recipe, parse_recipe
from support.fuzz import counted, fuzz_settings, strings_in
from support.hostile import SECRET_SHAPES

ARGUMENTS = sorted({name for cls in MODIFIERS.values() for name in cls.model_fields})
PLAUSIBLE = st.sampled_from(["W4A16", "W8A8", "FP8", "FP8_DYNAMIC", "Linear", "lm_head", "re:.*proj", "static", "group",
                             "channel", "tensor", "token", "2:4", "0:0", "int", "float", "minmax", "mse", "", "NoSuchScheme"])
NUMBERS = st.sampled_from([0, 1, 4, 8, 64, 128, -1, 2**40, 0.5, 0.01, 1e308]) | st.integers() | st.floats()
SCALARS = st.none() | st.booleans() | NUMBERS | PLAUSIBLE | st.text(max_size=8) | SECRET_SHAPES
KEYS = st.sampled_from(ARGUMENTS) | st.text(max_size=6) | SECRET_SHAPES
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=8)
QUANTIZER_KEYS = st.sampled_from(["num_bits", "type", "strategy", "group_size", "symmetric", "dynamic", "observer", "actorder"])
QUANTIZERS = st.dictionaries(QUANTIZER_KEYS, SCALARS | SECRET_SHAPES, max_size=5)
GROUP_BODIES = st.fixed_dictionaries({}, optional={"targets": st.lists(PLAUSIBLE, max_size=2) | SCALARS,
                                                   "weights": QUANTIZERS | SCALARS, "input_activations": QUANTIZERS | SCALARS})
VALUES = st.one_of(SCALARS, SECRET_SHAPES, st.lists(PLAUSIBLE | SECRET_SHAPES, max_size=3),
                   st.dictionaries(st.sampled_from(["group_0", "g"]), GROUP_BODIES, max_size=2),
                   st.lists(st.lists(PLAUSIBLE | SECRET_SHAPES, max_size=2), max_size=2), TREES)
NAMED_ARGS = st.sampled_from(ARGUMENTS)
ARGS = st.one_of(
    st.fixed_dictionaries({"scheme": st.one_of(PLAUSIBLE, SECRET_SHAPES, VALUES)}, optional={"ignore": VALUES, "targets": VALUES}),
    st.dictionaries(st.one_of(NAMED_ARGS, NAMED_ARGS, NAMED_ARGS, KEYS, st.integers()), VALUES, max_size=4),
    st.none(),
)
MODIFIER_NAMES = st.sampled_from(sorted(MODIFIERS))
SHAPED = st.dictionaries(  # stages of groups of modifiers, as recipes are written, with arguments of any value
    st.sampled_from(["quant_stage", "sparsity_stage", "quant_modifiers"]),
    st.one_of(*[st.dictionaries(st.sampled_from(["quant_modifiers", "smooth_modifiers"]),
                                st.dictionaries(st.one_of(MODIFIER_NAMES, MODIFIER_NAMES, MODIFIER_NAMES, SECRET_SHAPES), ARGS,
                                                min_size=1, max_size=2), min_size=1, max_size=2)] * 3,
              st.dictionaries(MODIFIER_NAMES | KEYS, ARGS, max_size=2)),
    min_size=1, max_size=2)
JUNK = st.dictionaries(st.sampled_from(["quant_stage", "args"]) | KEYS | st.integers(), TREES, max_size=3) | TREES
DOCUMENTS = st.one_of(SHAPED, SHAPED, SHAPED, JUNK)


@fuzz_settings(max_examples=1200)
@given(DOCUMENTS)
@counted
def test_parse_recipe_raises_only_model_press_errors_and_never_echoes_a_secret(document: Any) -> None:
    try:
        modifiers = parse_recipe(document)
    except ModelPressError as err:
        leaked = [s for s in strings_in(document) if secret_like(s) and s in str(err)]
        assert not leaked and "\n" not in str(err), str(err)
        return
    assert modifiers and all(type(m).__name__ in MODIFIERS for m in modifiers)


@fuzz_settings(max_examples=400)
@given(st.text(max_size=60) | st.sampled_from(["quant_stage: [", "a: &a [1]\nb: *a\n", "{", "- - - x", "? [a]\n: b"]))
@counted
def test_load_recipe_of_any_text_raises_only_model_press_errors(text: str) -> None:
    try:
        load_recipe(text + "\n")
    except ModelPressError as err:
        assert str(err).startswith("recipe")
