"""AWQ's optional clipping: per row and group, the shrunk range with least output error."""

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationScheme

from support.models import CORPUS
from modelpress.engine.awq import AWQModifier, fake_quantizer, feeds_attention_scores, search_clip
from modelpress.engine.rtn import QuantizationModifier
from modelpress.engine.oneshot import oneshot
from modelpress.engine.recipe import load_recipe, recipe_yaml

W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, xtx: torch.Tensor) -> float:
    dw = w - w_hat
    return float(torch.trace(dw @ xtx @ dw.T))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_outlier_weights_lowers_the_output_error(symmetric: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 128) * torch.linspace(0.5, 2, 128)
    xtx = x.T @ x
    w = torch.randn(48, 128)
    outliers = torch.rand(48, 128) < 0.01
    w = torch.where(outliers, 8 * w.sign() * w.abs().clamp(min=1), w)  # a few per row stretch their group's range
    fake = fake_quantizer(QuantizationScheme(targets=["Linear"], weights={**W4_G32, "symmetric": symmetric}))
    result = search_clip(w, xtx, fake, 32, symmetric, n_grid=20, max_shrink=0.5)

    assert (result.loss <= result.unclipped_loss).all()  # r = 1 is on the grid
    assert (result.ratios < 1).any() and result.ratios.min() >= 0.55 - 1e-6
    clipped, plain = output_error(w, fake(result.weight), xtx), output_error(w, fake(w), xtx)
    assert clipped < (0.9 if symmetric else 0.97) * plain, (clipped, plain)  # measured 0.84 and 0.95: asymmetric ranges already follow one-sided outliers
    kept = (result.ratios == 1).repeat_interleave(32, dim=1)
    assert torch.equal(result.weight[kept], w[kept])  # unclipped groups are untouched


@pytest.mark.parametrize("symmetric", [True, False])
def test_revising_the_clips_on_the_rows_whole_error_lowers_it_and_never_raises_a_row(symmetric: bool) -> None:
    """Correlated inputs couple the groups of a row: the per-group search cannot see the cross terms."""
    torch.manual_seed(2)
    mix = torch.randn(128, 128) / 128**0.5 + torch.eye(128)
    x = torch.randn(1024, 128) @ mix * torch.linspace(0.5, 2, 128)
    xtx = x.T @ x
    w = torch.randn(48, 128)
    w = torch.where(torch.rand(48, 128) < 0.02, 6 * w, w)
    fake = fake_quantizer(QuantizationScheme(targets=["Linear"], weights={**W4_G32, "symmetric": symmetric}))
    alone = search_clip(w, xtx, fake, 32, symmetric, n_grid=20, max_shrink=0.5)
    coupled = search_clip(w, xtx, fake, 32, symmetric, n_grid=20, max_shrink=0.5, passes=2)

    def row_errors(weight: torch.Tensor) -> torch.Tensor:
        dw = (w - fake(weight)).double()
        return ((dw @ xtx.double()) * dw).sum(1)

    before, after = row_errors(alone.weight), row_errors(coupled.weight)
    assert torch.all(after <= before * (1 + 1e-5))
    assert after.sum() < 0.99 * before.sum(), (after.sum(), before.sum())
    assert not torch.equal(coupled.ratios, alone.ratios) and coupled.ratios.min() >= 0.55 - 1e-6
    assert torch.equal(coupled.loss, alone.loss)  # the per-group search's own losses, as reported before
    one = search_clip(w[:, :32], xtx[:32, :32], fake, 32, symmetric, n_grid=20, max_shrink=0.5, passes=2)
    assert torch.equal(one.weight, search_clip(w[:, :32], xtx[:32, :32], fake, 32, symmetric, n_grid=20, max_shrink=0.5).weight)


def test_clip_passes_is_a_count() -> None:
    with pytest.raises(ValueError, match="clip_passes"):
        AWQModifier(apply_clip=True, clip_passes=-1)


def test_group_errors_are_the_diagonal_blocks_of_x_t_x() -> None:
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    w = torch.randn(8, 64)
    fake = fake_quantizer(QuantizationScheme(targets=["Linear"], weights={**W4_G32, "symmetric": True}))
    result = search_clip(w, x.T @ x, fake, 32, True, n_grid=1, max_shrink=0.5)  # only r = 1
    assert torch.equal(result.weight, w) and (result.ratios == 1).all()
    revised = search_clip(w, x.T @ x, fake, 32, True, n_grid=1, max_shrink=0.5, passes=2)  # one candidate: nothing to revise
    assert torch.equal(revised.weight, w) and (revised.ratios == 1).all()
    dw = w - fake(w)
    for g in range(2):
        part = slice(32 * g, 32 * g + 32)
        want = ((x[:, part] @ dw[:, part].T) ** 2).sum(0)  # each row's output error from group g alone
        assert torch.allclose(result.unclipped_loss[:, g], want, rtol=1e-4)


def test_q_and_k_are_left_unclipped() -> None:
    attention = ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.0.self_attn.qkv_proj"]
    others = ["model.layers.3.self_attn.v_proj", "model.layers.3.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj", "mlp.down_proj"]
    assert all(feeds_attention_scores(n) for n in attention)
    assert not any(feeds_attention_scores(n) for n in others)


def test_clip_arguments_round_trip_through_the_recipe() -> None:
    awq = AWQModifier(apply_clip=True, clip_max_shrink=0.3)
    quant = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": W4_G32}}, ignore=["lm_head"])
    text = recipe_yaml([awq, quant])
    assert "apply_clip: true" in text
    again, _ = load_recipe(text)
    assert again.apply_clip and again.clip_max_shrink == 0.3 and again.clip_n_grid == 20
    assert not AWQModifier().apply_clip  # off unless asked for


def test_awq_with_clipping_then_w4a16_g32(llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    def run(apply_clip: bool) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
        quant = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {**W4_G32, "symmetric": True}}}, ignore=["lm_head"])
        oneshot(model=model, recipe=[AWQModifier(apply_clip=apply_clip), quant], dataset=CORPUS, num_calibration_samples=8, max_seq_length=32)
        return model

    plain, clipped = run(False), run(True)
    a, b = plain.model.layers[0], clipped.model.layers[0]
    for name in ("q_proj", "k_proj"):  # same inputs and scales in layer 0; q/k are never clipped
        assert torch.equal(getattr(a.self_attn, name).weight, getattr(b.self_attn, name).weight), name
    changed = [n for n in ("gate_proj", "up_proj", "down_proj") if not torch.equal(getattr(a.mlp, n).weight, getattr(b.mlp, n).weight)]
    assert changed
