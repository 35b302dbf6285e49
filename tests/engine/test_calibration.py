"""Calibration data sources and the per-Linear statistics later algorithms build on."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from compressed_tensors.quantization import preset_name_to_scheme

from modelpress import ModelPressError
from modelpress.engine.calibration import calibration_samples, needs_tokenizer
from modelpress.engine.rtn import quantize_linear
from modelpress.engine.statistics import ActivationStats, StatsCollector

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", ""]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return tok


def test_sources(tokenizer, tmp_path: Path) -> None:
    from_list = calibration_samples(TEXTS, tokenizer, 10, 8)
    assert len(from_list) == 2 and all(s.shape[0] == 1 and 0 < s.shape[1] <= 8 for s in from_list)
    from_dataset = calibration_samples(Dataset.from_dict({"text": TEXTS}), tokenizer, 10, 8)
    assert sorted(s.tolist() for s in from_dataset) == sorted(s.tolist() for s in from_list)

    (tmp_path / "d.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
        + json.dumps({"text": TEXTS[0]}) + "\n"
    )
    samples = [s[0].tolist() for s in calibration_samples(tmp_path / "d.jsonl", tokenizer, 10, 64)]
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False)
    assert sorted(samples) == sorted([tokenizer(templated, add_special_tokens=False)["input_ids"], tokenizer(TEXTS[0])["input_ids"]])

    (tmp_path / "t.txt").write_text(" ".join(TEXTS * 20))
    windows = calibration_samples(tmp_path / "t.txt", tokenizer, 4, 16)
    assert len(windows) == 4 and all(w.shape == (1, 16) for w in windows)
    assert [w.tolist() for w in windows] == [w.tolist() for w in calibration_samples(tmp_path / "t.txt", tokenizer, 4, 16)]


def test_token_ids_go_in_as_they_are_without_a_tokenizer() -> None:
    ids = [[5, 6, 7, 8, 9], [1, 2], []]
    samples = calibration_samples(ids, None, 10, 4)
    assert sorted(s.tolist() for s in samples) == [[[1, 2]], [[5, 6, 7, 8]]]
    from_dataset = calibration_samples(Dataset.from_dict({"input_ids": ids}), None, 10, 4)
    assert sorted(s.tolist() for s in from_dataset) == sorted(s.tolist() for s in samples)
    assert not needs_tokenizer(ids) and not needs_tokenizer(Dataset.from_dict({"input_ids": ids})) and not needs_tokenizer(None)
    assert needs_tokenizer(TEXTS) and needs_tokenizer([[1, 2], "text"]) and needs_tokenizer(Dataset.from_dict({"text": TEXTS}))
    assert needs_tokenizer(Path("calibration.txt")) and needs_tokenizer([[1.5, 2.0]])


def test_bad_sources(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ModelPressError, match="not a file"):
        calibration_samples(tmp_path / "nope.jsonl", tokenizer, 4, 16)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ModelPressError, match="text_field"):
        calibration_samples(tmp_path / "bad.jsonl", tokenizer, 4, 16)


def test_stats_collector_matches_direct_computation() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    batches = [torch.randn(1, 5, 8), torch.randn(1, 3, 8) * 3]
    with StatsCollector({"l": linear}, hessians=True) as collector:
        for x in batches:
            linear(x)
    linear(torch.randn(1, 2, 8) * 100)  # hooks are gone after the block
    stats = collector.stats["l"]
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    assert stats.tokens == 8
    assert torch.equal(stats.xmin, x.min()) and torch.equal(stats.xmax, x.max())
    assert torch.equal(stats.channel_absmax, x.abs().amax(0))
    assert torch.allclose(stats.hessian, 2 * x.T @ x / 8, atol=1e-5)


def test_static_activation_scale_comes_from_observed_range() -> None:
    linear = torch.nn.Linear(16, 4)
    with StatsCollector({"l": linear}) as collector:
        linear(torch.linspace(-3, 5, 16).reshape(1, 1, 16))
    ql = quantize_linear(linear, preset_name_to_scheme("FP8", ["Linear"]), collector.stats["l"])
    assert ql.input_qparams is not None and ql.input_qparams.scale.item() == pytest.approx(5 / 448)
    with pytest.raises(ModelPressError, match="calibration data"):
        quantize_linear(torch.nn.Linear(16, 4), preset_name_to_scheme("FP8", ["Linear"]), None)


def test_hessian_of_wide_inputs_is_the_full_gram_matrix() -> None:
    """Wide inputs accumulate only the upper blocks of X^T X; the Hessian must still be all of it."""
    from modelpress.engine.statistics import ActivationStats

    x = torch.randn(600, 1100)
    stats = ActivationStats()
    stats.update(x[:250], True)
    stats.update(x[250:], True)
    assert torch.allclose(stats.hessian, 2 * x.T @ x / 600, atol=1e-4)


def test_ranges_are_gathered_only_for_the_modifiers_that_read_them() -> None:
    """GPTQ on weights alone reads only X^T X; static activation scales and smoothing read ranges."""
    from modelpress.engine.gptq import GPTQModifier
    from modelpress.engine.smoothquant import SmoothQuantModifier
    from modelpress.engine.sparsegpt import SparseGPTModifier

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    with StatsCollector({"l": linear}, hessians=True, ranges=False) as collector:
        linear(torch.randn(1, 5, 8))
    stats = collector.stats["l"]
    assert stats.tokens == 5 and stats.xtx is not None
    assert stats.xmin is None and stats.channel_absmax is None

    assert not SparseGPTModifier(sparsity=0.5).needs_ranges()
    assert SmoothQuantModifier().needs_ranges()
    w4a16, w8a8, fp8 = (GPTQModifier(scheme=s, targets=["Linear"]) for s in ("W4A16", "W8A8", "FP8"))
    for modifier in (w4a16, w8a8, fp8):
        modifier.plan(_one_linear_model())
    assert not w4a16.needs_ranges() and not w8a8.needs_ranges()  # dynamic activations: no range kept
    assert fp8.needs_ranges()  # a static input scale per tensor


def _one_linear_model() -> torch.nn.Module:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(128, 64))
    return model


def test_imatrix_statistics_are_the_mean_square_of_the_inputs() -> None:
    """E[x^2] per input channel, through the hooks and through the sequential path's chunks."""
    from modelpress.engine.statistics import group_stats

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    batches = [torch.randn(1, 5, 8) * torch.arange(1.0, 9.0), torch.randn(1, 3, 8)]
    with StatsCollector({"l": linear}, hessians=True) as collector:
        for x in batches:
            linear(x)
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    assert torch.allclose(collector.stats["l"].mean_square, x.square().mean(0), rtol=1e-6)
    chunked = group_stats(lambda: iter([x[:3], x[3:]]), with_hessian=True, with_ranges=False)
    assert torch.allclose(chunked.mean_square, x.square().mean(0), rtol=1e-6)


def test_imatrix_mse_reads_each_linears_calibration_inputs(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What GPTQ's observer weighs layer 0's q/k/v by is E[x^2] of exactly the inputs q_proj sees
    on the calibration tokens (the first layer's inputs are the float model's)."""
    from transformers import AutoModelForCausalLM

    import modelpress.engine.gptq as gptq_module
    from modelpress.engine.gptq import GPTQModifier
    from modelpress.engine.oneshot import oneshot
    from support.models import CORPUS

    seen: list[torch.Tensor] = []
    real = gptq_module.importance
    monkeypatch.setattr(gptq_module, "importance", lambda name, stats: seen.append(real(name, stats)) or seen[-1])
    recipe = GPTQModifier(scheme="W4A16", ignore=["lm_head"], weight_observer="imatrix_mse", actorder="group_aware")
    oneshot(model=llama_dir, recipe=recipe, dataset=CORPUS, num_calibration_samples=8, max_seq_length=16, output_dir=tmp_path / "out")

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for sample in calibration_samples(CORPUS, tokenizer, 8, 16):
            model(sample)
    hook.remove()
    direct = torch.cat(inputs).square().mean(0)
    assert seen[0] is not None and torch.allclose(seen[0], direct, rtol=1e-4, atol=1e-7)


def test_rtn_with_imatrix_mse_gathers_what_it_needs(llama_dir: Path, tmp_path: Path) -> None:
    from modelpress.engine.oneshot import oneshot
    from modelpress.engine.rtn import QuantizationModifier
    from support.models import CORPUS

    rtn = QuantizationModifier(scheme="W4A16", ignore=["lm_head"], weight_observer="imatrix_mse")
    assert rtn.needs_data() and rtn.needs_hessians()
    assert not QuantizationModifier(scheme="W4A16", weight_observer="mse").needs_data()
    with pytest.raises(ModelPressError, match=r"needs calibration data \(QuantizationModifier\)"):
        oneshot(model=llama_dir, recipe=rtn, output_dir=tmp_path / "a")
    result = oneshot(model=llama_dir, recipe=rtn, dataset=CORPUS, num_calibration_samples=8, max_seq_length=16, output_dir=tmp_path / "b")
    assert result.quantized_modules == 14


def test_mean_square_is_the_same_before_and_after_the_hessian_takes_its_storage() -> None:
    """GPTQ asks for the Hessian (made in X^T X's place) before imatrix_mse asks for E[x^2]."""
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    stats = ActivationStats()
    stats.update(x, with_hessian=True)
    before = stats.mean_square.clone()
    stats.hessian
    assert torch.allclose(before, x.square().mean(0), rtol=1e-6)
    assert torch.allclose(stats.mean_square, before, rtol=1e-6)
