"""ModelPress's outputs against what vLLM's compressed-tensors loader accepts (support/vllm_rules.py).

Every scheme of the README's table, through the recipe a CompressionJob builds for it, plus GPTQ
with zero points, 2:4 pruning, channel-wise int4 and mixture-of-experts models; then broken
checkpoints (corrupted by hand, or written from recipes vLLM cannot serve), each of which the
checker must name.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from support.models import CORPUS, REPO, make_model
from support.vllm_rules import Problem, check_dir
from modelpress import QuantizationModifier, oneshot
from modelpress.contract import DEFAULT_IGNORE, PRESETS
from modelpress.engine.modifier import Modifier
from modelpress.engine.recipe import parse_recipe
from modelpress.engine.sparsegpt import SparseGPTModifier
from modelpress.runner.presets import preset_document

MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96},
}
INT4 = {"num_bits": 4, "type": "int", "symmetric": True}
Recipe = Callable[[], list[Modifier]]
Build = Callable[[str, torch.dtype, Recipe, str], tuple[Path, Path]]


def preset(name: str, algorithm: str = "RTN", ignore: tuple[str, ...] = DEFAULT_IGNORE) -> Recipe:
    """The recipe a CompressionJob with `recipe: {preset, algorithm}` runs."""
    return lambda: parse_recipe(preset_document(name, algorithm, list(ignore)))


def groups(ignore: tuple[str, ...] = DEFAULT_IGNORE, **bodies: dict) -> Recipe:
    return lambda: [QuantizationModifier(config_groups=bodies, ignore=list(ignore))]


G32 = {"targets": ["Linear"], "weights": {**INT4, "strategy": "group", "group_size": 32}}
# name -> (architecture, model dtype, recipe)
GOOD = {
    **{f"{p}-RTN": ("llama", torch.float32, preset(p)) for p in PRESETS},
    "W4A16-RTN-bf16": ("llama", torch.bfloat16, preset("W4A16")),
    "W4A16_ASYM-GPTQ": ("llama", torch.float32, preset("W4A16_ASYM", "GPTQ")),
    "W8A8-GPTQ": ("llama", torch.float32, preset("W8A8", "GPTQ")),
    "W4A16-SparseGPT+GPTQ": ("llama", torch.float32, preset("W4A16", "SparseGPT+GPTQ")),
    "2:4-sparse": ("llama", torch.float32, lambda: [SparseGPTModifier(mask_structure="2:4", ignore=["lm_head"])]),
    "int4-channel-asym": ("llama", torch.float32, groups(g={"targets": ["Linear"], "weights": {**INT4, "symmetric": False, "strategy": "channel"}})),
    "qwen2-W4A16_ASYM-RTN": ("qwen2", torch.float32, preset("W4A16_ASYM")),
    "mixtral-int4-g32": ("mixtral", torch.float32, groups(g=G32)),
    "mixtral-FP8_DYNAMIC-RTN": ("mixtral", torch.float32, preset("FP8_DYNAMIC")),
    "mixtral-W8A8-RTN": ("mixtral", torch.float32, preset("W8A8")),
    "qwen2_moe-int4-g32-shared-gate-ignored": ("qwen2_moe", torch.float32, groups(("lm_head", "re:.*shared_expert_gate$"), g=G32)),
    "qwen2_moe-int4-g32": ("qwen2_moe", torch.float32, groups(g=G32)),
}
# Written by the engine today, refused by vLLM: a known gap (the module at fault, why), reported as xfail.
KNOWN_GAPS: dict[str, tuple[str, str]] = {}
# Recipes the engine accepts whose outputs vLLM refuses; the checker must say why.
UNSERVABLE = {
    "qkv-mixed-schemes": ("llama", groups(k={"targets": ["re:.*k_proj$"], "weights": {"num_bits": 8, "strategy": "channel"}},
                                          rest={"targets": ["Linear"], "weights": {**INT4, "strategy": "group", "group_size": 128}})),
    "q-ignored-alone": ("llama", preset("W4A16", ignore=("lm_head", "model.layers.0.self_attn.q_proj"))),
    "moe-int4-asym": ("mixtral", groups(g={"targets": ["Linear"], "weights": {**INT4, "symmetric": False, "strategy": "group", "group_size": 32}})),
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Build:
    """(output, source) for a recipe on a tiny model, built once per module."""
    sources: dict[tuple[str, torch.dtype], Path] = {}
    outputs: dict[str, tuple[Path, Path]] = {}

    def make(arch: str, dtype: torch.dtype, recipe: Recipe, name: str) -> tuple[Path, Path]:
        if name not in outputs:
            if (arch, dtype) not in sources:
                sources[arch, dtype] = make_model(arch, tmp_path_factory.mktemp(arch), tokenizer_dir, dtype, **MOE.get(arch, {}))
            out = tmp_path_factory.mktemp("out") / name
            oneshot(model=sources[arch, dtype], recipe=recipe(), dataset=CORPUS, num_calibration_samples=16,
                    max_seq_length=32, output_dir=out)
            outputs[name] = (out, sources[arch, dtype])
        return outputs[name]

    return make


def good(build: Build, name: str) -> tuple[Path, Path]:
    arch, dtype, recipe = GOOD[name]
    return build(arch, dtype, recipe, name)


def test_the_suite_covers_every_scheme_of_the_readme_table() -> None:
    readme = (REPO / "README.md").read_text()
    table = re.search(r"^\| scheme \| weights \|.*?\n\n", readme, re.S | re.M).group(0)
    rows = [row for row in table.splitlines()[2:] if row.startswith("|")]
    names = {n for row in rows for n in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert names == set(PRESETS)
    assert {f"{p}-RTN" for p in PRESETS} <= set(GOOD)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_vllm_reads_the_output(build: Build, name: str) -> None:
    out, source = good(build, name)
    problems = check_dir(out, source)
    if name in KNOWN_GAPS:  # fails as soon as the gap closes (or another problem appears): then it moves out
        module, reason = KNOWN_GAPS[name]
        assert problems and all(p.where.endswith(module) for p in problems), "\n".join(map(str, problems))
        pytest.xfail(reason)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("name", sorted(UNSERVABLE))
def test_outputs_vllm_cannot_serve_are_named(build: Build, name: str) -> None:
    arch, recipe = UNSERVABLE[name]
    out, source = build(arch, torch.float32, recipe, name)
    problems = check_dir(out, source)
    where, words, count = {  # count: problems in all (each layer has the flaw, or only the first)
        "qkv-mixed-schemes": ("model.layers.0.self_attn.qkv_proj", ("k_proj (k)", "different schemes"), 6),
        "q-ignored-alone": ("model.layers.0.self_attn.qkv_proj", ("only k_proj, v_proj are quantized", "all of them or none"), 1),
        "moe-int4-asym": ("model.layers.0.block_sparse_moe.experts", ("only symmetric weights", "no zero points"), 2),
    }[name]
    assert_named(problems, where, words)
    assert len(problems) == count, "\n".join(map(str, problems))


def rewrite(out: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply `change` to the tensors of every shard, in place."""
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})


def edit_config(out: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((out / "config.json").read_text())
    change(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


def rename_expert(tensors: dict[str, torch.Tensor]) -> None:
    for name in [n for n in tensors if ".experts.0.w1." in n]:
        tensors[name.replace(".w1.", ".gate_proj.")] = tensors.pop(name)


Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
DOWN = "model.layers.1.mlp.down_proj"
# name -> (good output, corruption, the module or key named, words of the message)
BROKEN = {
    "packed shape": ("W4A16-RTN", lambda t: t.update({f"{Q}.weight_packed": torch.zeros(128, 32, dtype=torch.int32)}),
                     Q, ("weight_packed has shape [128, 32]", "[128, 16]")),
    "zero points unpacked": ("W4A16_ASYM-RTN", lambda t: t.update({f"{K}.weight_zero_point": torch.zeros(64, 1, dtype=torch.int32)}),
                             K, ("weight_zero_point has shape [64, 1]", "[8, 1]")),
    "missing scale": ("W8A8-RTN", lambda t: t.pop(f"{DOWN}.weight_scale"), DOWN, ("missing weight_scale",)),
    "missing input scale": ("FP8-RTN", lambda t: t.pop(f"{Q}.input_scale"), Q, ("missing input_scale",)),
    "fp8 weight in bf16": ("FP8_DYNAMIC-RTN", lambda t: t.update({f"{K}.weight": t[f"{K}.weight"].to(torch.bfloat16)}),
                           K, ("weight is BF16", "F8_E4M3")),
    "int8 weights packed": ("W8A8-RTN", lambda t: t.update({f"{Q}.weight_packed": t.pop(f"{Q}.weight").view(torch.int32)}),
                            Q, ("missing weight,",)),
    "weight_shape swapped": ("W4A16-RTN", lambda t: t.update({f"{DOWN}.weight_shape": torch.tensor([256, 128])}),
                             DOWN, ("weight_shape holds [256, 128]", "[128, 256]")),
    "expert renamed": ("mixtral-int4-g32", rename_expert, "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight_packed",
                       ("not named as vLLM's FusedMoE reads experts", "w1|w3|w2")),
}
BROKEN_CONFIGS = {
    "ignore names nothing": ("W4A16-RTN", lambda q: q["ignore"].append("model.layers.0.mlp.gate_projection"),
                             "quantization_config.ignore", ("'model.layers.0.mlp.gate_projection' names no module",)),
    "format for activations": ("W8A8-RTN", lambda q: q["config_groups"]["group_0"].update(format="pack-quantized"),
                               "model.layers.0.self_attn.qkv_proj", ("not pack-quantized",)),
    "sparse format": ("W4A16-SparseGPT+GPTQ", lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask", "targets": ["Linear"]}),
                      "quantization_config.sparsity_config", ("vLLM no longer reads sparse formats",)),
}


def assert_named(problems: list[Problem], where: str, words: tuple[str, ...]) -> None:
    assert any(p.where == where and all(w in p.message for w in words) for p in problems), "\n".join(map(str, problems))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_corrupted_checkpoint_is_named(build: Build, tmp_path: Path, name: str) -> None:
    base, change, where, words = BROKEN[name]
    out, source = good(build, base)
    broken = shutil.copytree(out, tmp_path / "broken")
    rewrite(broken, change)
    assert check_dir(out, source) == []
    assert_named(check_dir(broken, source), where, words)


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_a_config_vllm_cannot_read_is_named(build: Build, tmp_path: Path, name: str) -> None:
    base, change, where, words = BROKEN_CONFIGS[name]
    out, source = good(build, base)
    broken = shutil.copytree(out, tmp_path / "broken")
    edit_config(broken, change)
    assert_named(check_dir(broken, source), where, words)


def test_transformers_loads_packed_zero_points_only_dequantized(build: Build) -> None:
    """What the model card tells users: transformers' compressed loader refuses asymmetric int4
    (zero points packed along the output dim), `CompressedTensorsConfig(dequantize=True)` loads it;
    symmetric int4 loads either way."""
    asym, _ = good(build, "W4A16_ASYM-RTN")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(asym)
    ids = torch.tensor([[1, 5, 9, 13]])
    loaded = AutoModelForCausalLM.from_pretrained(asym, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    sym, _ = good(build, "W4A16-RTN")
    assert AutoModelForCausalLM.from_pretrained(sym).generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
