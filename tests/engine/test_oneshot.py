"""oneshot end to end: streaming memory, hub ids, data requirements and protected outputs."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from support.models import CORPUS
from modelpress import ModelPressError, QuantizationModifier, oneshot
from modelpress.engine import pipeline
from modelpress.engine.pipeline import LayerProgress

W8 = QuantizationModifier(scheme="W8A16", ignore=["lm_head"])


def test_streaming_holds_one_layer_at_a_time(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.nn.Module] = []
    peaks: list[int] = []
    real = pipeline.materialize

    def counting(layer, prefix, source, device):
        peaks.append(sum(not any(p.is_meta for p in m.parameters()) for m in seen))
        seen.append(layer)
        real(layer, prefix, source, device)

    monkeypatch.setattr(pipeline, "materialize", counting)
    events: list[LayerProgress] = []
    result = oneshot(model=llama_dir, recipe=W8, output_dir=tmp_path / "out", progress=events.append)
    assert peaks == [0, 0]  # the previous layer was freed before the next one loaded
    assert all(p.is_meta for layer in seen for p in layer.parameters())
    assert [(e.layer, e.layers) for e in events] == [(1, 2), (2, 2)] and events[-1].percent == 100.0
    assert [r.index for r in result.layers] == [0, 1] and len(result.layers[0].quantized) == 7
    assert 0 < result.output_bytes < result.input_bytes


def test_hub_id_resolves_through_the_hub_cache(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / revision
    shutil.copytree(llama_dir, snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    result = oneshot(model="acme/tiny-llama", recipe=W8, output_dir=tmp_path / "out")
    assert result.quantized_modules == 14
    with pytest.raises(ModelPressError, match="cannot fetch acme/other"):
        oneshot(model="acme/other", recipe=W8, output_dir=tmp_path / "out2")


def test_static_activations_need_data(llama_dir: Path, tmp_path: Path) -> None:
    fp8 = QuantizationModifier(scheme="FP8", ignore=["lm_head"])
    with pytest.raises(ModelPressError, match="dataset"):
        oneshot(model=llama_dir, recipe=fp8, output_dir=tmp_path / "out")
    with pytest.raises(ModelPressError, match="outside the decoder layers"):
        oneshot(model=llama_dir, recipe=QuantizationModifier(scheme="FP8"), dataset=CORPUS, output_dir=tmp_path / "out")
    result = oneshot(model=llama_dir, recipe=fp8, dataset=CORPUS, num_calibration_samples=8, max_seq_length=16, output_dir=tmp_path / "out")
    assert result.quantized_modules == 14


def test_existing_output_is_never_overwritten(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    oneshot(model=llama_dir, recipe=W8, output_dir=out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ModelPressError, match="already holds a model"):
        oneshot(model=llama_dir, recipe=W8, output_dir=out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_model_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelPressError, match="neither a model directory nor a hub id"):
        oneshot(model=str(tmp_path / "missing"), recipe=W8, output_dir=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPressError, match="no config.json"):
        oneshot(model=tmp_path / "empty", recipe=W8, output_dir=tmp_path / "out")
    with pytest.raises(ModelPressError, match="recipe"):
        oneshot(model=tmp_path / "empty", output_dir=tmp_path / "out")


def test_token_ids_calibrate_without_loading_a_tokenizer(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress import GPTQModifier
    from modelpress.engine import oneshot as oneshot_module
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = [tokenizer(t)["input_ids"] for t in CORPUS[:8]]
    recipe = [GPTQModifier(scheme="W4A16", ignore=["lm_head"])]
    by_text = oneshot(model=llama_dir, recipe=recipe, dataset=CORPUS[:8], output_dir=tmp_path / "text", max_seq_length=64)

    def refuse(*_a, **_k):
        raise AssertionError("a tokenizer was loaded for token ids")

    monkeypatch.setattr(oneshot_module, "load_tokenizer", refuse)
    by_ids = oneshot(model=llama_dir, recipe=recipe, dataset=ids, output_dir=tmp_path / "ids", max_seq_length=64)
    assert [r.quantized for r in by_ids.layers] == [r.quantized for r in by_text.layers]
    shards = sorted(p.name for p in (tmp_path / "text").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "ids").glob("*.safetensors"))
    assert all((tmp_path / "ids" / f).read_bytes() == (tmp_path / "text" / f).read_bytes() for f in [*shards, "tokenizer_config.json"])
