"""The spec as an attacker or a hurried user writes it: every problem at once, no secret echoed,
free-form trees bounded before anything walks them, and locations that stay inside their root."""

import copy
import time
from typing import Any

import pytest
import yaml

from modelpress.contract import (MAX_TREE_DEPTH, MAX_TREE_VALUES, InvalidSpec, parse_job, parse_uri, secret_like, shown,
                                 tree_problem)
from support.hostile import AWS_KEY_ID, AWS_SECRET, HF_TOKEN, alias_bomb, bomb_job

BASE: dict[str, Any] = {
    "apiVersion": "modelpress.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"uri": "hf://acme/tiny"},
        "recipe": {"preset": "W4A16", "algorithm": "RTN"},
        "output": {"uri": "s3://models/tiny", "connection": "models-s3"},
    },
}


def problems(doc: Any) -> list[str]:
    with pytest.raises(InvalidSpec) as err:
        parse_job(doc)
    return err.value.problems


def with_spec(**sections: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(sections)
    return doc


def test_cross_field_and_field_problems_come_out_in_one_run() -> None:
    doc = with_spec(
        model={"uri": "/models/tiny", "revision": "main", "connection": "src"},
        recipe={"preset": "W4A16", "algorithm": "GPTQ"},
        calibration={"numSamples": 0},
        evaluation={"maxPerplexityIncrease": 5, "maxNewTokens": 0},
        output={"uri": "/tmp/out", "connection": "models-s3"},
        runtime={"resources": {"gpus": -1}},
    )
    found = problems(doc)
    expected = [
        "spec.model.revision: only applies to hf:// models",
        "spec.model.connection: only applies to s3:// models",
        "spec.calibration.numSamples: must be ≥ 1 (got 0)",
        "spec.calibration.dataset: GPTQ with W4A16 needs calibration data",
        "spec.evaluation.maxNewTokens: must be ≥ 1 (got 0)",
        "spec.evaluation.maxPerplexityIncrease: needs evaluation.perplexity",
        "spec.output.connection: only applies to s3:// outputs",
        "spec.runtime.resources.gpus: must be ≥ 0 (got -1)",
    ]
    for line in expected:
        assert sum(p.startswith(line) for p in found) == 1, (line, found)
    assert len(found) == len(expected), found


def test_a_recipe_field_problem_and_its_rule_are_both_listed() -> None:
    found = problems(with_spec(recipe={"modifiers": {"quant_stage": {}}, "groupSize": 3}))
    assert found == ["spec.recipe.groupSize: must be ≥ 8 (got 3)",
                     "spec.recipe.groupSize: only applies to a preset; set it inside the recipe instead"]


@pytest.mark.parametrize("secret", [HF_TOKEN, AWS_SECRET, AWS_KEY_ID])
@pytest.mark.parametrize(("section", "value", "field"), [
    ("model", lambda s: {"uri": "hf://acme/tiny", "tokenSecret": {"name": s, "key": "HF_TOKEN"}}, "spec.model.tokenSecret.name"),
    ("output", lambda s: {"uri": "s3://models/tiny", "connection": s}, "spec.output.connection"),
    ("recipe", lambda s: {"preset": s}, "spec.recipe.preset"),
    ("runtime", lambda s: {"resources": {"memory": s}}, "spec.runtime.resources.memory"),
    ("calibration", lambda s: {s: 1}, "spec.calibration.[a value shaped like a secret (not shown)]"),
    ("model", lambda s: {"uri": f"{s}://x"}, "spec.model.uri"),
    ("evaluation", lambda s: {"maxNewTokens": s}, "spec.evaluation.maxNewTokens"),
])
def test_a_secret_in_the_wrong_field_is_named_but_never_echoed(section: str, value: Any, field: str, secret: str) -> None:
    found = problems(with_spec(**{section: value(secret)}))
    assert len(found) == 1 and found[0].startswith(f"{field}: "), found
    assert secret not in found[0] and secret[4:24] not in found[0]


def test_a_token_typed_as_a_secret_name_says_what_belongs_there() -> None:
    [problem] = problems(with_spec(model={"uri": "hf://acme/tiny", "tokenSecret": {"name": HF_TOKEN, "key": "HF_TOKEN"}}))
    assert problem == ("spec.model.tokenSecret.name: a value shaped like a secret (not shown) is not valid here; use a Kubernetes "
                       "name (lower-case letters, digits, '-' and '.'), and give the name of the Secret that holds a key, never "
                       "the key itself")


def test_ordinary_values_are_still_shown() -> None:
    assert problems(with_spec(runtime={"resources": {"memory": "lots"}})) == [
        "spec.runtime.resources.memory: 'lots' is not valid here; use a Kubernetes quantity such as 4, 500m, 16Gi"]
    for plain in ("meta-llama/Llama-3.1-8B-Instruct", "llama-8b-w4a16", "W4A16_ASYM", "models-s3", "FP8_DYNAMIC"):
        assert not secret_like(plain), plain
    for secret in (HF_TOKEN, AWS_SECRET, AWS_KEY_ID, "ghp_" + "a1B2" * 9):
        assert secret_like(secret) and shown(secret) == "a value shaped like a secret (not shown)"
    assert shown({"k": HF_TOKEN}) == "a dict" and shown(3) == "3"


def test_an_alias_bomb_in_the_recipe_is_refused_at_once() -> None:
    text = bomb_job()
    _, leaves = alias_bomb()
    assert len(text.encode()) < 1024 and leaves == 10**7
    document = yaml.safe_load(text)  # aliases share one object: loading expands nothing
    began = time.monotonic()
    found = problems(document)
    assert time.monotonic() - began < 0.2
    assert found == [f"spec.recipe.modifiers: too many values; at most {MAX_TREE_VALUES} values (each use of a YAML alias "
                     f"counts), nested at most {MAX_TREE_DEPTH} deep, with at most 1048576 characters of text"]


def test_an_alias_bomb_in_the_affinity_is_refused_at_once() -> None:
    bomb, _ = alias_bomb()
    tree = yaml.safe_load(bomb + "top: {nodeAffinity: *l6}\n")
    began = time.monotonic()
    found = problems(with_spec(runtime={"affinity": tree["top"]}))
    assert time.monotonic() - began < 0.2 and found[0].startswith("spec.runtime.affinity: too many values")


def test_tree_bounds_are_exact() -> None:
    assert tree_problem(["x"] * (MAX_TREE_VALUES - 1)) is None  # the list and its leaves
    assert tree_problem(["x"] * MAX_TREE_VALUES).startswith("too many values")
    deep: Any = "leaf"
    for _ in range(MAX_TREE_DEPTH):
        deep = [deep]
    assert tree_problem(deep) is None
    assert tree_problem([deep]).startswith("too deeply nested")
    shared = "y" * 4096
    assert tree_problem([shared] * 255) is None and tree_problem([shared] * 257).startswith("too much text")
    assert tree_problem({"a": {"b": [1, 2.5, None, True]}}) is None


@pytest.mark.parametrize(("text", "message"), [
    ("pvc://claim/../../etc", "pvc:// locations may not hold '..'; name the place inside the claim itself"),
    ("pvc://claim/models/..", "pvc:// locations may not hold '..'"),
    ("pvc://../x", "pvc:// locations may not hold '..'"),
    ("pvc://Claim_1/x", "pvc:// needs a PVC name after it"),
    ("s3://bucket/models/../../../tmp/x", "s3:// locations may not hold '..'; name the place inside the bucket itself"),
    ("hf://../../etc/passwd", "hf:// locations may not hold '..'"),
    ("s3://./models", "s3:// needs a name after it"),
    ("pvc://claim/a\x00b", "holds a control character; remove it"),
])
def test_remote_locations_cannot_leave_their_root(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_uri(text)
    assert str(err.value).startswith(message)
    found = problems(with_spec(model={"uri": text}))
    assert found == [f"spec.model.uri: {err.value}"]


def test_locations_inside_their_root_still_parse() -> None:
    assert parse_uri("pvc://claim/a/b..c/d").path == "a/b..c/d"
    assert parse_uri("s3://bucket/..x/y").path == "..x/y"
    assert parse_uri("../models/tiny").path == "../models/tiny"  # a local path is the user's own
