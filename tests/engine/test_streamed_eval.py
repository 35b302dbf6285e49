"""Perplexity layer by layer from disk equals the whole model's, for float and every compressed format."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from modelpress import QuantizationModifier, oneshot
from modelpress.engine.streamed_eval import streamed_perplexity
from modelpress.runner.evaluation import perplexity
from modelpress.runner.smollm2 import smollm2_dir
from support.models import CORPUS

CPU = torch.device("cpu")
SCHEMES = ["W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "W8A8"]


def whole_model(path: Path) -> torch.nn.Module:
    quantized = "quantization_config" in json.loads((path / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto", **extra).eval()


def compressed(src: Path, out: Path, scheme: str, group: int) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": "ASYM" not in scheme,
                                                            "strategy": "group", "group_size": group}}}
    recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"]) if scheme.startswith("W4") else \
        QuantizationModifier(scheme=scheme, ignore=["lm_head"])
    oneshot(model=src, recipe=recipe, output_dir=out)
    return out


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
def test_streamed_perplexity_is_the_whole_models(llama_dir: Path, tmp_path: Path, scheme: str | None) -> None:
    model_dir = compressed(llama_dir, tmp_path / "out", scheme, 32) if scheme else llama_dir
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    text = " ".join(CORPUS * 4)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:300]
    expected = perplexity(whole_model(model_dir), tokenizer, text, 300, 64)
    assert streamed_perplexity(model_dir, ids, 64, CPU) == pytest.approx(expected, rel=1e-5)


def test_streamed_evaluation_holds_one_layer_at_a_time(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress.engine import streamed_eval

    live: list[int] = []
    real = streamed_eval.materialize

    def counting(module, prefix, source, device, skip_prefix=None):
        real(module, prefix, source, device, skip_prefix)
        if prefix:  # a decoder layer
            live.append(sum(1 for p in module.parameters() if not p.is_meta))

    monkeypatch.setattr(streamed_eval, "materialize", counting)
    seen_layers: list[torch.nn.Module] = []
    real_release = streamed_eval.release
    monkeypatch.setattr(streamed_eval, "release", lambda layer: (seen_layers.append(layer), real_release(layer)))
    streamed_perplexity(llama_dir, torch.arange(1, 100), 32, CPU)
    assert len(live) == 2 and all(p.is_meta for layer in seen_layers for p in layer.parameters())


@pytest.mark.quality
@pytest.mark.parametrize("scheme", ["W4A16_ASYM"])  # float is the tiny models' case; one SmolLM2 run keeps CI short
def test_smollm2_streamed_perplexity_matches_the_whole_model(tmp_path: Path, scheme: str | None) -> None:
    smollm2 = smollm2_dir()
    model_dir = compressed(smollm2, tmp_path / "out", scheme, 64) if scheme else smollm2
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = (Path(__file__).parents[1] / "data" / "wikitext-2" / "evaluation.txt").read_text()[:40_000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:1024]
    expected = perplexity(whole_model(model_dir), tokenizer, text, 1024, 512)
    assert streamed_perplexity(model_dir, ids, 512, CPU) == pytest.approx(expected, rel=1e-5)
