"""Where calibration activations are kept: spilled to disk a run writes the same bytes as in
memory, in 16 bits it stays within a stated perplexity bound, and spilled pieces stay inside the
scratch folder and are gone when the run ends, finished, killed or resumed."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modelpress import GPTQModifier, SmoothQuantModifier, oneshot
from modelpress.engine import activations, gptq, layer_pass, pipeline
from modelpress.engine.activations import Storage
from modelpress.engine.errors import ModelPressError
from modelpress.engine.streamed_eval import streamed_perplexity
from support.models import CORPUS, make_model
from support.spills import spill_folders

# 16-bit storage rounds every kept activation to 8 (bfloat16) or 11 (float16) significant bits:
# on the tiny model the compressed perplexity moves by less than this fraction
COMPACT_PERPLEXITY_BOUND = 0.01


def gptq_w4() -> list:
    return [GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])]


def smoothquant_gptq_w8a8() -> list:
    return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of a few samples' rows, so that samples straddle pieces and blocks span several."""
    monkeypatch.setattr(layer_pass, "TOKEN_CHUNK", 40)
    monkeypatch.setattr(pipeline, "TOKEN_CHUNK", 40)
    monkeypatch.setattr(layer_pass, "DROPPED_CHUNK", 120)
    monkeypatch.setattr(layer_pass, "MLP_CHUNK", 16)  # MLP outputs written across the pieces' edges


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("deep"), tokenizer_dir, num_hidden_layers=3)


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def compress(model: Path, out: Path, recipe: list, storage: str = "memory", spill: Path | None = None, **kwargs) -> Path:
    oneshot(model=model, recipe=recipe, dataset=CORPUS, num_calibration_samples=12, max_seq_length=32, output_dir=out,
            activation_storage=storage, spill_dir=spill, **kwargs)
    return out


def spilled(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("recipe", [gptq_w4, smoothquant_gptq_w8a8])
def test_a_spilled_run_writes_the_bytes_an_in_memory_run_writes(deep_llama: Path, tmp_path: Path, recipe, monkeypatch) -> None:
    seen = spill_folders(monkeypatch)
    memory = shards(compress(deep_llama, tmp_path / "memory", recipe()))
    assert not seen
    scratch = tmp_path / "scratch"
    disk = shards(compress(deep_llama, tmp_path / "disk", recipe(), "disk", scratch / "activations"))
    assert disk == memory
    # every kept activation went through files: hidden states, norm outputs, inner activations, per layer
    assert len(seen) >= 3 * 4 and all(f.resolve().is_relative_to((scratch / "activations").resolve()) for f in seen)
    assert spilled(scratch) == []


def test_spilled_pieces_are_removed_when_a_run_is_killed(deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = gptq.gptq, {"n": 0, "files": 0}
    spill = tmp_path / "spill"

    def dies_in_layer_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            calls["files"] = len(spilled(spill))
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq", dies_in_layer_two)
    with pytest.raises(KeyboardInterrupt):
        compress(deep_llama, tmp_path / "out", gptq_w4(), "disk", spill)
    assert calls["files"] > 0 and spilled(spill) == []


def test_a_resumed_spilled_run_writes_the_uninterrupted_bytes(deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = shards(compress(deep_llama, tmp_path / "whole", gptq_w4()))
    real, calls = gptq.gptq, {"n": 0}

    def dies_in_layer_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq", dies_in_layer_three)
    spill, layers, events = tmp_path / "spill", tmp_path / "layers", []
    with pytest.raises(KeyboardInterrupt):
        compress(deep_llama, tmp_path / "out", gptq_w4(), "disk", spill, resume_dir=layers)
    monkeypatch.setattr(gptq, "gptq", real)
    assert sorted(p.name for p in layers.glob("layer-*.pt")) == ["layer-00000.pt", "layer-00001.pt"]
    compress(deep_llama, tmp_path / "out", gptq_w4(), "disk", spill, resume_dir=layers, progress=events.append)
    assert [e.resumed_at for e in events] == [2] and shards(tmp_path / "out") == whole
    assert spilled(spill) == []


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_16_bit_activations_stay_within_the_perplexity_bound(deep_llama: Path, tmp_path: Path, kind: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(deep_llama)
    ids = tokenizer(" ".join(CORPUS * 4), return_tensors="pt")["input_ids"][0]
    memory = compress(deep_llama, tmp_path / "memory", gptq_w4())
    compact = compress(deep_llama, tmp_path / kind, gptq_w4(), kind)
    assert shards(compact) != shards(memory)  # the rounding is real
    base = streamed_perplexity(memory, ids, 64, torch.device("cpu"))
    got = streamed_perplexity(compact, ids, 64, torch.device("cpu"))
    assert abs(got / base - 1) < COMPACT_PERPLEXITY_BOUND, (got, base)


@pytest.mark.parametrize("kind", ["memory", "bfloat16", "disk"])
def test_rows_read_write_update_and_drain_across_pieces(tmp_path: Path, kind: str) -> None:
    storage = Storage(kind, tmp_path / "spill")  # type: ignore[arg-type]
    values = torch.randn(50, 6)
    rows = storage.rows(50, 6, torch.float32, 16)
    rows.write(0, values[:21])
    rows.write(21, values[21:])
    rows.write(30, values[30:33])  # a few rows inside a piece: written into it, not around it
    exact = values.bfloat16().float() if kind == "bfloat16" else values
    assert torch.equal(rows.read(0, 50), exact) and torch.equal(rows.read(13, 35), exact[13:35])
    assert [c.shape[0] for c in rows.chunks()] == [16, 16, 16, 2]
    rows.update(lambda x: x.mul_(2))
    assert torch.equal(rows.read(0, 50), exact * 2)
    assert torch.equal(torch.cat(list(rows.drain())), exact * 2)
    with pytest.raises(RuntimeError, match="read after they were released"):
        rows.read(0, 1)
    storage.close()
    assert spilled(tmp_path / "spill") == []


def test_disk_needs_a_scratch_folder_and_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ModelPressError, match="activation_storage: disk needs a scratch folder"):
        Storage("disk")
    with pytest.raises(ModelPressError, match="activation_storage: 'int4' is not one of"):
        Storage("int4")  # type: ignore[arg-type]
    assert activations.COMPACT["bfloat16"] is torch.bfloat16
