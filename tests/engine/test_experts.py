"""Mixture-of-experts models: experts as Linears, checkpoint names, and compression end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from support.models import CORPUS, make_model
from modelpress.engine.experts import (
    ExpertLinears,
    expert_layout,
    from_checkpoint_name,
    route_all_tokens,
    to_checkpoint_name,
    unfuse_experts,
)
from modelpress.engine.gptq import GPTQModifier
from modelpress.engine.smoothquant import SmoothQuantModifier
from modelpress.engine.oneshot import oneshot

MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96},
}
W4_G32 = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32, "symmetric": True, "strategy": "group"}}}


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[str, Path]:
    return request.param, make_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir, **MOE[request.param])


def ids() -> torch.Tensor:
    return torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_expert_linears_compute_what_the_fused_experts_compute(moe_dir: tuple[str, Path]) -> None:
    arch, model_dir = moe_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = model(ids()).logits
    assert unfuse_experts(model, expert_layout(model.config.model_type)) == 2
    assert all(isinstance(layer.mlp.experts, ExpertLinears) for layer in model.model.layers)
    assert torch.allclose(model(ids()).logits, before, atol=1e-5)
    route_all_tokens(model, True)  # every expert sees every token; the output still counts routed ones only
    assert torch.allclose(model(ids()).logits, before, atol=1e-5)


def test_names_follow_the_checkpoint() -> None:
    layout = expert_layout("mixtral")
    assert (layout.gate, layout.up, layout.down) == ("w1", "w3", "w2")
    disk = "model.layers.3.block_sparse_moe.experts.7.w2.weight"
    assert from_checkpoint_name(disk, layout) == "model.layers.3.mlp.experts.7.w2.weight"
    assert to_checkpoint_name(from_checkpoint_name(disk, layout), layout) == disk
    qwen = expert_layout("qwen2_moe")
    assert (qwen.gate, qwen.up, qwen.down, qwen.renames) == ("gate_proj", "up_proj", "down_proj", ())
    assert expert_layout("llama") is None


@pytest.mark.parametrize("recipe", ["gptq_w4a16", "smoothquant_gptq_w8a8"])
def test_moe_checkpoint_loads_back_as_the_engine_left_it(moe_dir: tuple[str, Path], tmp_path: Path, recipe: str) -> None:
    arch, model_dir = moe_dir
    modifiers = (
        [GPTQModifier(config_groups=W4_G32, ignore=["lm_head"])]
        if recipe == "gptq_w4a16"
        else [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", ignore=["lm_head"])]
    )
    streamed = oneshot(model=str(model_dir), dataset=CORPUS, recipe=modifiers, num_calibration_samples=8, max_seq_length=32, output_dir=tmp_path / "out")
    in_memory = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    oneshot(model=in_memory, dataset=CORPUS, recipe=[type(m)(**m.model_dump()) for m in modifiers], num_calibration_samples=8, max_seq_length=32)

    names = {k for f in (tmp_path / "out").glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    layout = expert_layout(arch)
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for e in range(4):
        for linear in (layout.gate, layout.up, layout.down):
            stem = f"model.layers.1.{block}.experts.{e}.{linear}"
            assert f"{stem}.weight_scale" in names
    # qwen2_moe adds the shared expert's three Linears; its shared_expert_gate stays float, as vLLM builds it
    assert streamed.quantized_modules == 2 * (4 + 12 + (3 if arch == "qwen2_moe" else 0))
    assert not any(k.startswith("model.layers.1.mlp.shared_expert_gate.weight_") for k in safe_open(next((tmp_path / "out").glob("*.safetensors")), "pt").keys())
    for r in streamed.layers:  # every expert was fitted on the calibration tokens, routed to it or not
        expert_losses = [v for k, v in r.losses.items() if ".experts." in k]
        assert len(expert_losses) == 12 and all(v > 0 for v in expert_losses)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in config["ignore"]

    if recipe != "gptq_w4a16":
        # transformers 5.24's reader cannot fuse int8 experts stored as `.weight` (it concatenates
        # before dequantizing); vLLM reads experts one by one. Check the stored tensors directly.
        tensors = {k: f.get_tensor(k) for p in (tmp_path / "out").glob("*.safetensors") for f in [safe_open(p, "pt")] for k in f.keys()}
        for name, p in in_memory.named_parameters():
            if ".experts." in name:
                stem = to_checkpoint_name(name.removesuffix(".weight"), layout)
                assert tensors[f"{stem}.weight"].dtype == torch.int8
                assert torch.equal(tensors[f"{stem}.weight"].float() * tensors[f"{stem}.weight_scale"], p), name
        return
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    # the in-memory run is a second computation (transformers' forward, not the engine's layer by
    # layer one): from the second layer on, its inputs differ by float noise, which moves a scale
    # by an ulp or flips a rare rounding (a few in 10^4); a loader that misplaced experts or scales
    # would differ nearly everywhere
    def nearly_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
        return (~torch.isclose(got, want, rtol=1e-5, atol=0)).float().mean().item() < 1e-3

    for name, p in in_memory.named_parameters():
        if "experts" in name and name.endswith("weight"):
            continue  # compared through the fused tensors below
        assert nearly_equal(p, loaded.get_parameter(name)), name
    for i, layer in enumerate(in_memory.model.layers):
        experts = loaded.model.layers[i].mlp.experts
        gate_up = torch.stack([torch.cat([getattr(x, layout.gate).weight, getattr(x, layout.up).weight]) for x in layer.mlp.experts])
        down = torch.stack([getattr(x, layout.down).weight for x in layer.mlp.experts])
        for got, want in ((gate_up, experts.gate_up_proj), (down, experts.down_proj)):
            assert nearly_equal(got, want)


def test_explicit_moe_mappings_scale_the_router_only_for_the_block_input(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_dir = make_model("mixtral", tmp_path, tokenizer_dir, **MOE["mixtral"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    unfuse_experts(model, expert_layout("mixtral"))
    with torch.no_grad():
        before = model(ids()).logits
    recipe = SmoothQuantModifier(mappings=[
        [["re:.*experts.*w1$", "re:.*experts.*w3$"], "re:.*post_attention_layernorm$"],  # llm-compressor's MoE form
        [["re:.*experts.0.w2$"], "re:.*experts.0.w3$"],  # inside the block: the router reads nothing of it
    ])
    plan = recipe.plan(model)
    scaled_too = {m.smooth: m.scaled_too for m in plan.mappings}
    assert scaled_too["model.layers.0.post_attention_layernorm"] == ("model.layers.0.mlp.gate",)
    assert scaled_too["model.layers.0.mlp.experts.0.w3"] == ()
    oneshot(model=model, dataset=CORPUS, recipe=recipe, num_calibration_samples=8, max_seq_length=32)
    with torch.no_grad():
        assert torch.allclose(model(ids()).logits, before, atol=1e-4)
