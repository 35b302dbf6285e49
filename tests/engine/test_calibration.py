"""Calibration data sources and the per-Linear statistics later algorithms build on."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from compressed_tensors.quantization import preset_name_to_scheme

from modelpress import ModelPressError
from modelpress.engine.calibration import calibration_samples
from modelpress.engine.rtn import quantize_linear
from modelpress.engine.statistics import StatsCollector

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
