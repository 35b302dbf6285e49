"""SmoothQuant and AWQ scaling: mappings per architecture, float invariance, consistent statistics."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from support.models import CORPUS, make_model
from modelpress.engine.calibration import calibration_samples
from modelpress.engine.errors import ModelPressError
from modelpress.engine.experts import expert_layout, unfuse_experts
from modelpress.engine.mappings import derive_mappings
from modelpress.engine.awq import AWQModifier
from modelpress.engine.gptq import GPTQModifier
from modelpress.engine.modifier import Modifier, plan_recipe
from modelpress.engine.rtn import QuantizationModifier
from modelpress.engine.smoothquant import SmoothQuantModifier
from modelpress.engine.oneshot import oneshot
from modelpress.engine.activations import MemoryRows, Storage
from modelpress.engine.pipeline import capture_calibration, run_pipeline
from modelpress.engine.smoothing import rescale_inputs
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.weights import find_decoder_layers

# per architecture: the mappings of one decoder layer (v -> o only where v's width is o's input)
EXPECTED = {
    "llama": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],  # 2 KV heads of 4: no v -> o
    "qwen2": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "qwen3": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "gemma": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
    "gemma2": ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"],
    "phi3": ["input_layernorm", "self_attn.qkv_proj", "post_attention_layernorm", "mlp.gate_up_proj"],
    # MoE: the norm feeds every expert (and the shared one), each expert's up feeds its down
    "mixtral": ["input_layernorm", "post_attention_layernorm"] + [f"mlp.experts.{e}.w3" for e in range(4)],
    "qwen2_moe": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm"]
    + [f"mlp.experts.{e}.up_proj" for e in range(4)]
    + ["mlp.shared_expert.up_proj"],
}
OVERRIDES = {
    "llama": {},
    "qwen2": {"num_key_value_heads": 4},
    "mistral": {},
    "qwen3": {"num_key_value_heads": 4, "head_dim": 32},
    "gemma": {"num_key_value_heads": 4, "head_dim": 32},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 32},
    "phi3": {"num_key_value_heads": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96},
}
MOE = {"mixtral", "qwen2_moe"}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[str, Path]:
    arch = request.param
    return arch, make_model(arch, tmp_path_factory.mktemp(arch), tokenizer_dir, **OVERRIDES[arch])


def engine_view(model: torch.nn.Module) -> torch.nn.Module:
    """The model as oneshot works on it: MoE experts as one Linear each."""
    unfuse_experts(model, expert_layout(model.config.model_type))
    return model


def load(model_dir: Path) -> torch.nn.Module:
    model = engine_view(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # norms away from their init, so folding them is tested
        if p.dim() == 1 and "norm" in name:
            p.data += 0.3 * torch.randn_like(p)
    return model


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(CORPUS[1] + " " + CORPUS[2], return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits


def scale_only(model: torch.nn.Module, model_dir: Path, modifier: Modifier, follower: Modifier | None = None) -> list:
    """Run only the smoothing modifier through the pipeline (the follower is planned, never applied)."""
    recipe = [modifier] + ([follower] if follower else [])
    plans = plan_recipe(recipe, model)
    samples = calibration_samples(CORPUS, AutoTokenizer.from_pretrained(model_dir), 8, 32)
    prefix, layers = find_decoder_layers(model)
    inputs = capture_calibration(model, layers[0], samples, torch.device("cpu"), Storage())
    _, reports = run_pipeline(prefix, layers, [modifier], plans[:1], inputs, None, None, torch.device("cpu"))
    return reports


def test_mappings_follow_each_architecture(arch_dir: tuple[str, Path]) -> None:
    arch, model_dir = arch_dir
    model = engine_view(AutoModelForCausalLM.from_pretrained(model_dir))
    _, layers = find_decoder_layers(model)
    mappings = derive_mappings(layers[0], "")
    assert [m.smooth for m in mappings] == EXPECTED[arch]
    if arch in MOE:  # every expert balanced; the router follows the scales without being quantized
        experts = layers[0].mlp.experts
        norm_mapping = next(m for m in mappings if m.smooth == "post_attention_layernorm")
        assert {f"mlp.experts.{e}.{n}" for e in range(len(experts)) for n in experts[0].names[:2]} <= set(norm_mapping.balance)
        assert norm_mapping.scaled_too == ("mlp.gate",)


@pytest.mark.parametrize("kind", ["smoothquant", "awq"])
def test_scaling_alone_leaves_the_float_model_unchanged(arch_dir: tuple[str, Path], kind: str) -> None:
    arch, model_dir = arch_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir)
    before = logits(model, tokenizer)
    norms = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 1 and "norm" in n}
    if kind == "smoothquant":
        reports = scale_only(model, model_dir, SmoothQuantModifier(smoothing_strength=0.8))
    else:
        follower = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32, "symmetric": True, "strategy": "group"}}}, ignore=["lm_head"])
        reports = scale_only(model, model_dir, AWQModifier(n_grid=10, duo_scaling="both"), follower)
    changed = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])]
    assert changed, "no scale was folded into any norm"
    assert all(r.sequential for r in reports) == (arch not in MOE)  # MoE layers take the generic path
    after = logits(model, tokenizer)
    assert torch.allclose(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item()), (after - before).abs().max()


def test_rescaled_statistics_are_those_of_the_scaled_inputs() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(1, 7, 16) * torch.linspace(0.1, 5, 16) for _ in range(3)]
    s = torch.rand(16) + 0.5
    stats = ActivationStats()
    for x in xs:
        stats.update(x, with_hessian=True)
    expected = ActivationStats()
    for x in xs:
        expected.update(x / s, with_hessian=True)
    rows = MemoryRows(21, 16, torch.float32, 7, torch.device("cpu"))
    rows.write(0, torch.cat([x[0] for x in xs]))
    rescale_inputs(stats, s, rows)
    assert torch.allclose(rows.read(0, 21), torch.cat([x[0] for x in xs]) / s)
    for got, want in [(stats.xtx, expected.xtx), (stats.channel_absmax, expected.channel_absmax), (stats.xmin, expected.xmin), (stats.xmax, expected.xmax)]:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gptq_after_smoothing_sees_the_smoothed_inputs(llama_dir: Path) -> None:
    """One pass of SmoothQuant + GPTQ quantizes layer 0's q/k/v as GPTQ does on the pre-smoothed model."""

    def gptq() -> GPTQModifier:
        # observed scales: refitted ones follow the last bits of the two runs' Hessians; this compares roundings
        return GPTQModifier(scheme="W8A8", ignore=["lm_head"], refit_scales=0)

    joint = load(llama_dir)
    oneshot(model=joint, recipe=[SmoothQuantModifier(), gptq()], dataset=CORPUS, num_calibration_samples=8, max_seq_length=32)
    apart = load(llama_dir)
    oneshot(model=apart, recipe=[SmoothQuantModifier()], dataset=CORPUS, num_calibration_samples=8, max_seq_length=32)
    smoothed_q = apart.model.layers[0].self_attn.q_proj.weight.clone()
    oneshot(model=apart, recipe=[gptq()], dataset=CORPUS, num_calibration_samples=8, max_seq_length=32)
    for name in ("q_proj", "k_proj", "v_proj"):
        a = getattr(joint.model.layers[0].self_attn, name).weight
        b = getattr(apart.model.layers[0].self_attn, name).weight
        assert (a == b).float().mean() > 0.99, name
    assert not torch.equal(smoothed_q, joint.model.layers[0].self_attn.q_proj.weight)  # and it was quantized


def test_recipe_order_and_mapping_errors(llama_dir: Path) -> None:
    model = load(llama_dir)
    with pytest.raises(ModelPressError, match="add a QuantizationModifier or GPTQModifier after it"):
        oneshot(model=model, recipe=[AWQModifier()], dataset=CORPUS, max_seq_length=32)
    with pytest.raises(ModelPressError, match="must come before GPTQModifier"):
        oneshot(model=model, recipe=[GPTQModifier(scheme="W8A8"), SmoothQuantModifier()], dataset=CORPUS, max_seq_length=32)
    bad = [[["re:.*o_proj"], "re:.*v_proj"]]  # grouped-query attention: v is narrower than o's input
    with pytest.raises(ModelPressError, match=r"SmoothQuantModifier.mappings\[0\]: .*v_proj has 64 output channels but .*o_proj reads 128"):
        SmoothQuantModifier(mappings=bad).plan(model)
    with pytest.raises(ModelPressError, match=r"AWQModifier.mappings\[0\]: expected \{smooth_layer"):
        AWQModifier(mappings=[[["re:.*q_proj"], "re:.*input_layernorm"]])
    with pytest.raises(ModelPressError, match="matches no module"):
        SmoothQuantModifier(mappings=[[["re:.*q_proj"], "re:.*ln_1$"]]).plan(model)


def test_explicit_mappings_replace_the_derived_ones(llama_dir: Path) -> None:
    model = load(llama_dir)
    only_mlp = SmoothQuantModifier(mappings=[[["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]])
    planned = only_mlp.plan(model)
    assert sorted(planned) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up"))
    awq = AWQModifier(mappings=[{"smooth_layer": "re:.*input_layernorm", "balance_layers": ["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"]}])
    assert len(awq.plan(model)) == 6


def test_an_awq_modifier_with_its_own_scheme_becomes_awq_then_rtn() -> None:
    from modelpress.engine.recipe import load_recipe

    old = "quant_stage:\n  quant_modifiers:\n    AWQModifier: {scheme: W4A16_ASYM, ignore: [lm_head], n_grid: 5}\n"
    awq, rtn = load_recipe(old)
    assert isinstance(awq, AWQModifier) and awq.n_grid == 5 and type(rtn) is QuantizationModifier
    assert rtn.ignore == ["lm_head"] and rtn.groups["group_0"].weights.symmetric is False


def test_awq_search_lowers_the_measured_output_error() -> None:
    from compressed_tensors.quantization import QuantizationScheme

    from modelpress.engine.awq import search_scales
    from modelpress.engine.awq import fake_quantizer

    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.where(torch.arange(64) % 16 == 0, 20.0, 1.0)  # four outlier channels
    w = torch.randn(48, 64)
    scheme = QuantizationScheme(targets=["Linear"], weights={"num_bits": 4, "strategy": "group", "group_size": 32})
    fake = fake_quantizer(scheme)
    result = search_scales(x.T @ x, 512, [w], [fake], 32, 20, duo_scaling=True)

    def measured(s: torch.Tensor) -> float:
        return float(((x @ w.T - x @ (fake(w * s) / s).T) ** 2).sum())

    assert result.ratio is not None and result.loss < 0.8 * result.unscaled_loss
    assert measured(result.scales) == pytest.approx(result.loss, rel=1e-3)
    assert measured(torch.ones(64)) == pytest.approx(result.unscaled_loss, rel=1e-3)


def test_the_gram_matrix_of_wide_inputs_has_both_triangles() -> None:
    """Wide inputs accumulate only the blocks of X^T X on and above the diagonal; AWQ's output
    error tr(dW X^T X dW^T) needs the whole matrix, which `gram` gives."""
    from modelpress.engine.statistics import GRAM_BLOCK

    torch.manual_seed(0)
    x = torch.randn(40, 2 * GRAM_BLOCK + 64)
    stats = ActivationStats()
    stats.update(x, with_hessian=True)
    full = x.T @ x
    assert not torch.allclose(stats.xtx, full)  # the stored form: lower blocks left at zero
    assert torch.allclose(stats.gram, full, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.hessian, full * 2 / 40, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("preset", "algorithm", "modifiers"),
    [("W4A16_ASYM", "AWQ", ["AWQModifier", "QuantizationModifier"]), ("W8A8", "SmoothQuant+GPTQ", ["SmoothQuantModifier", "GPTQModifier"])],
)
def test_job_presets_compress(llama_dir: Path, tmp_path: Path, preset: str, algorithm: str, modifiers: list[str]) -> None:
    import json

    from modelpress.engine.recipe import parse_recipe
    from modelpress.runner.presets import preset_document

    recipe = parse_recipe(preset_document(preset, algorithm, ["lm_head"], group_size=32 if "W4" in preset else None))
    out = tmp_path / "out"
    result = oneshot(model=llama_dir, recipe=recipe, dataset=CORPUS, num_calibration_samples=8, max_seq_length=32, output_dir=out)
    assert result.quantized_modules == 14
    import yaml

    applied = yaml.safe_load((out / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]
    assert list(applied) == modifiers
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]
