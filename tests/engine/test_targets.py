"""Targets and ignore follow llm-compressor; preflight stops bad group sizes before any work."""

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from transformers import AutoModelForCausalLM

from support.models import make_model
from modelpress import ModelPressError, QuantizationModifier, oneshot
from modelpress.engine.targets import match_rank, resolve_targets


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(llama_dir)


def test_match_kinds(model: torch.nn.Module) -> None:
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    assert match_rank(name, module, name) > match_rank(name, module, "re:.*down_proj$") > match_rank(name, module, "Linear") > 0
    assert match_rank(name, module, "Module") > 0  # any base class
    assert match_rank(name, module, "re:down_proj") == 0  # re.match anchors at the start
    assert match_rank(name, module, "Embedding") == 0


def test_most_specific_group_wins(model: torch.nn.Module) -> None:
    groups = {
        "all": preset_name_to_scheme("W8A16", ["Linear"]),
        "down": preset_name_to_scheme("W4A16", ["re:.*down_proj$"]),
        "one": preset_name_to_scheme("FP8_DYNAMIC", ["model.layers.1.mlp.down_proj"]),
    }
    plan = resolve_targets(model, groups, ignore=["lm_head", "re:.*k_proj$"])
    assert plan["model.layers.0.mlp.down_proj"].group == "down"
    assert plan["model.layers.1.mlp.down_proj"].group == "one"
    assert plan["model.layers.0.self_attn.q_proj"].group == "all"
    assert "lm_head" not in plan and "model.layers.0.self_attn.k_proj" not in plan


def test_indivisible_group_size_names_layers_and_fix(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = make_model("llama", tmp_path / "m", tokenizer_dir, hidden_size=192, intermediate_size=384, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ModelPressError) as err:
        oneshot(model=src, recipe=QuantizationModifier(scheme="W4A16", ignore=["lm_head"]), output_dir=tmp_path / "out")
    message = str(err.value)
    assert "group_size 128" in message and "model.layers.0.self_attn.q_proj (192)" in message
    assert "group_size: 64" in message and "ignore" in message
    assert not (tmp_path / "out").exists()  # nothing was written
    assert "\n" not in message


def test_unknown_target_is_reported(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelPressError, match="re:.*qkv_proj"):
        oneshot(model=llama_dir, recipe=QuantizationModifier(scheme="W8A16", targets=["re:.*qkv_proj"]), output_dir=tmp_path)
