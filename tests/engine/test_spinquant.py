"""SpinQuant rotations: orthogonal matrices, logits preserved per architecture, checkpoints that
load, and refusals of what cannot be fused."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from support.models import make_model
from modelpress import QuantizationModifier, oneshot
from modelpress.engine.errors import ModelPressError
from modelpress.engine.learned_rotation import learn_rotation, objective, quantizer_args, sample_weights
from modelpress.engine.modifier import plan_recipe
from modelpress.engine.recipe import load_recipe
from modelpress.engine import rotation
from modelpress.engine.rotation import build_rotation, hadamard, rotate_columns, rotate_rows
from modelpress.engine.spinquant import SpinQuantModifier
from modelpress.engine.weights import find_decoder_layers

G32 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
OVERRIDES = {  # value heads as wide as o's input where R2 has something to pair, per-head norms for Qwen3
    "llama": {},
    "mistral": {},
    "qwen2": {"num_key_value_heads": 4},
    "qwen3": {"head_dim": 32},
    "gemma": {"num_key_value_heads": 4, "head_dim": 32, "tie_word_embeddings": True},
    "phi3": {"num_key_value_heads": 4},
}
IDS = torch.tensor([[1, 7, 30, 99, 4, 250, 17, 3, 64, 128, 9, 11]])


def quantizer() -> QuantizationModifier:
    return QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": G32}}, ignore=["lm_head"])


def perturbed(model_dir: Path, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The model with its norms moved away from their init, so that folding them is tested."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.data += 0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
    return model


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard", "random-matrix"])
def test_rotations_are_orthogonal_and_block_diagonal(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotation, "CHUNK", 2)  # rows rotated a few at a time give the same product
    r = build_rotation(192, 64, kind, seed=5)
    q = r.dense()
    assert torch.allclose(q @ q.T, torch.eye(192, dtype=torch.float64), atol=1e-12)
    assert q[:64, 64:].abs().max() == 0 and q[64:128, 64:128].abs().min() > 0 or kind == "random-matrix"
    w = torch.randn(5, 192, dtype=torch.float64)
    assert torch.allclose(rotate_columns(w, r), w @ q) and torch.allclose(rotate_rows(w.T, r), q.T @ w.T)
    if kind != "hadamard":  # the seed decides the random ones
        assert torch.equal(build_rotation(192, 64, kind, seed=5).blocks, r.blocks)
        assert not torch.equal(build_rotation(192, 64, kind, seed=6).blocks, r.blocks)
    assert torch.equal(hadamard(4) * 2, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64))


@pytest.mark.parametrize("arch", sorted(OVERRIDES))
def test_rotation_keeps_the_logits_in_float64(arch: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    """R1 + R2 with norms folded (Gemma's 1 + w, Qwen3's per-head norms, Phi-3's fused qkv) change no logit
    (to 1e-6: Gemma's norm computes in float32 even in a float64 model)."""
    model_dir = make_model(arch, tmp_path / arch, tokenizer_dir, **OVERRIDES[arch])
    model = perturbed(model_dir)
    before = logits(model)
    v_before = model.model.layers[0].self_attn.get_submodule("qkv_proj" if arch == "phi3" else "v_proj").weight.clone()
    oneshot(model=model, recipe=SpinQuantModifier(rotations=["R1", "R2"], transform_block_size=32), device="cpu")
    after = logits(model)
    assert relative(after, before) < 1e-6
    layer = model.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == (0 if arch == "gemma" else 1))  # folded
    v = layer.self_attn.get_submodule("qkv_proj" if arch == "phi3" else "v_proj").weight
    assert relative(v, v_before) > 0.1  # and rotated
    if arch == "gemma":  # tied: the head got its own rotated copy, and the config says so
        assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings


def test_each_rotation_alone_keeps_the_logits(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_dir = make_model("qwen2", tmp_path / "m", tokenizer_dir, num_key_value_heads=4)
    for rotations in (["R1"], ["R2"]):
        model = perturbed(model_dir)
        before = logits(model)
        oneshot(model=model, recipe=SpinQuantModifier(rotations=rotations, transform_type="random-matrix"), device="cpu")
        assert relative(logits(model), before) < 1e-6, rotations


def test_rotated_quantized_checkpoint_loads_with_the_engines_answers(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Streamed from disk and written, then read by transformers: the weights the engine
    quantized, and the same greedy answers. Tied embeddings come out untied."""
    src = make_model("llama", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True)
    recipe = [SpinQuantModifier(transform_block_size=64), quantizer()]
    out = tmp_path / "out"
    oneshot(model=src, recipe=recipe, output_dir=out, device="cpu")
    engine = AutoModelForCausalLM.from_pretrained(src)
    oneshot(model=engine, recipe=recipe, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, p in engine.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p), name
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    greedy = loaded.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, engine.generate(IDS[:, :4], max_new_tokens=6, do_sample=False))


def test_float_rotation_round_trips_through_a_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = make_model("mistral", tmp_path / "m", tokenizer_dir)
    out = tmp_path / "out"
    oneshot(model=src, recipe=SpinQuantModifier(transform_type="random-hadamard", transform_block_size=64), output_dir=out, device="cpu")
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    rotated = AutoModelForCausalLM.from_pretrained(out).eval()
    assert relative(logits(rotated), logits(original)) < 1e-4  # float32
    assert not torch.allclose(rotated.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_yaml_recipe_with_llm_compressor_fields(tmp_path: Path, tokenizer_dir: Path) -> None:
    recipe = load_recipe("""
quant_stage:
  quant_modifiers:
    SpinQuantModifier:
      rotations: [R1, R2]
      transform_type: hadamard
      transform_block_size: 32
      mappings: {embedding: 're:.*embed_tokens$', attn_q: 're:.*q_proj$', attn_k: 're:.*k_proj$', attn_v: 're:.*v_proj$',
                 attn_o: 're:.*o_proj$', mlp_in: ['re:.*up_proj$', 're:.*gate_proj$'], mlp_out: 're:.*down_proj$', lm_head: lm_head}
      norm_mappings:
        - {norm: 're:.*input_layernorm$', linears: ['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$']}
        - {norm: 're:.*post_attention_layernorm$', linears: ['re:.*up_proj$', 're:.*gate_proj$']}
        - {norm: model.norm, linears: [lm_head]}
""")
    model = perturbed(make_model("llama", tmp_path / "m", tokenizer_dir))
    before = logits(model)
    oneshot(model=model, recipe=recipe, device="cpu")
    assert relative(logits(model), before) < 1e-6


@pytest.mark.parametrize(
    "arguments, words",
    [
        ({"rotations": ["R1", "R2", "R3"]}, ("R3", "vLLM", "rotations: [R1, R2]")),
        ({"rotations": ["R4"]}, ("R4", "rotations: [R1, R2]")),
        ({"transform_block_size": 80}, ("transform_block_size: 80 does not divide the hidden_size 192", "transform_block_size: 64")),
        ({}, ("power of two", "192", "transform_block_size: 64")),  # the whole width is not a power of two
        ({"transform_type": "learned", "transform_block_size": 64}, ("learned", "GPTQModifier")),  # nothing to fit to
    ],
)
def test_what_cannot_be_fused_is_refused_with_the_fix(arguments: dict, words: tuple[str, ...], tmp_path: Path, tokenizer_dir: Path) -> None:
    model_dir = make_model("llama", tmp_path / "m", tokenizer_dir, hidden_size=192, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(ModelPressError) as err:
        oneshot(model=AutoModelForCausalLM.from_pretrained(model_dir), recipe=SpinQuantModifier(**arguments), device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_rotation_must_come_first_and_gemma2_post_norms_are_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_model("llama", tmp_path / "l", tokenizer_dir))
    with pytest.raises(ModelPressError, match="SpinQuantModifier must come first"):
        plan_recipe([quantizer(), SpinQuantModifier()], model)
    gemma2 = AutoModelForCausalLM.from_pretrained(make_model("gemma2", tmp_path / "g", tokenizer_dir, head_dim=32))
    with pytest.raises(ModelPressError, match="post_attention_layernorm.*rotations: \\[R2\\]"):
        plan_recipe([SpinQuantModifier()], gemma2)
    before = logits(gemma2.double())
    oneshot(model=gemma2, recipe=SpinQuantModifier(rotations=["R2"]), device="cpu")  # R2 alone needs no norm folded
    assert relative(logits(gemma2), before) < 1e-6


def test_learned_rotation_is_reproducible_and_lowers_the_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_model("llama", tmp_path / "m", tokenizer_dir)).eval()
    spin = SpinQuantModifier(transform_type="learned", transform_block_size=32)
    plan = plan_recipe([spin, quantizer()], model)[0]
    params = dict(model.named_parameters())
    read = lambda name: params[name].detach()  # noqa: E731
    start = build_rotation(128, 32, "random-hadamard", seed=0)
    args = quantizer_args(plan.quantizer)
    first = learn_rotation(start, list(plan.layouts.values()), read, args, steps=30, seed=0)
    again = learn_rotation(start, list(plan.layouts.values()), read, args, steps=30, seed=0)
    other = learn_rotation(start, list(plan.layouts.values()), read, args, steps=30, seed=1)
    assert torch.equal(first.blocks, again.blocks)
    assert not torch.equal(first.blocks, other.blocks)
    q = first.dense()
    assert torch.allclose(q @ q.T, torch.eye(128, dtype=torch.float64), atol=1e-10)
    assert not torch.allclose(q, start.dense(), atol=1e-3)  # it moved
    readers, writers = sample_weights(list(plan.layouts.values()), read, False, 32, seed=0)
    r, w = torch.cat(readers), torch.cat(writers)
    error = lambda rot: float(objective(rot.dense().float(), r, w, args, 32, r.pow(2).sum(), w.pow(2).sum()))  # noqa: E731
    assert error(first) < 0.9 * error(start)
    # and it fuses like any other rotation: the float model is unchanged
    model = model.double()
    before = logits(model)
    plan = spin.transform_model(plan, model, read)
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        spin.transform_layer(plan, layer, f"{prefix}.{i}.")
    assert relative(logits(model), before) < 1e-6


@pytest.mark.quality
def test_smollm2_rotated_keeps_its_logits_in_float32() -> None:
    """The real model (tied embeddings, 576 = 9 x 64 wide, 64-wide heads): R1 in Hadamard blocks of 64, and R2."""
    from modelpress.runner.smollm2 import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    oneshot(model=model, recipe=SpinQuantModifier(transform_block_size=64), device="cpu")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert relative(after, before) < 1e-4
    assert model.lm_head.weight is not model.model.embed_tokens.weight
