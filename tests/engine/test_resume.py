"""Per-layer resume: a compression cut off at any layer continues there and writes the same bytes."""

import hashlib
from pathlib import Path

import pytest
import torch

from modelpress import GPTQModifier, QuantizationModifier, oneshot
from modelpress.engine import gptq
from modelpress.engine.pipeline import LayerProgress
from support.models import CORPUS, make_model

GPTQ = GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("deep"), tokenizer_dir, num_hidden_layers=5)


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def run(model: Path, out: Path, resume: Path | None, events: list[LayerProgress], recipe=GPTQ) -> None:
    oneshot(model=model, recipe=recipe, dataset=CORPUS, num_calibration_samples=8, max_seq_length=32, output_dir=out,
            progress=events.append, resume_dir=resume)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(deep_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("whole") / "out"
    run(deep_llama, out, None, [])
    return shards(out)


@pytest.mark.parametrize("cut", [1, 6, 11, 20])
def test_a_run_cut_mid_layer_resumes_at_that_layer_with_the_same_bytes(
    deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict[str, str], cut: int
) -> None:
    real, calls = gptq.gptq, {"n": 0}

    def dies_at_call(*args, **kwargs):  # 4 solves a layer (q/k/v, o, gate/up, down): the cut lands inside a layer
        calls["n"] += 1
        if calls["n"] == cut:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq", dies_at_call)
    first: list[LayerProgress] = []
    with pytest.raises(Killed):
        run(deep_llama, tmp_path / "out", tmp_path / "layers", first)
    monkeypatch.setattr(gptq, "gptq", real)
    finished = len(first)
    assert finished == (cut - 1) // 4

    second: list[LayerProgress] = []
    run(deep_llama, tmp_path / "out2", tmp_path / "layers", second)
    assert second[0].resumed_at == finished and second[0].layer == finished + 1  # no finished layer is redone
    assert [e.layer for e in second] == list(range(finished + 1, 6))
    assert shards(tmp_path / "out2") == uninterrupted


def test_changed_calibration_or_recipe_never_resumes(deep_llama: Path, tmp_path: Path, uninterrupted: dict[str, str]) -> None:
    stop = {"at": 2}

    def dies(update: LayerProgress) -> None:
        if update.layer == stop["at"]:
            raise Killed

    with pytest.raises(Killed):
        oneshot(model=deep_llama, recipe=GPTQ, dataset=CORPUS[::-1], num_calibration_samples=8, max_seq_length=32,
                output_dir=tmp_path / "a", progress=dies, resume_dir=tmp_path / "layers")
    events: list[LayerProgress] = []
    run(deep_llama, tmp_path / "b", tmp_path / "layers", events)  # other calibration text: starts over
    assert events[0].resumed_at == 0 and events[0].layer == 1
    assert shards(tmp_path / "b") == uninterrupted

    rtn: list[LayerProgress] = []
    run(deep_llama, tmp_path / "c", tmp_path / "layers", rtn, recipe=QuantizationModifier(scheme="W8A16", ignore=["lm_head"]))
    assert rtn[0].resumed_at == 0


def test_a_kill_while_saving_activations_redoes_one_layer(deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         uninterrupted: dict[str, str]) -> None:
    from modelpress.engine import resume

    real, calls = resume.ResumeState.save_activations, {"n": 0}

    def dies_on_third(self, after: int, *hidden: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed  # layer 3 is recorded, its activations are not
        real(self, after, *hidden)

    monkeypatch.setattr(resume.ResumeState, "save_activations", dies_on_third)
    with pytest.raises(Killed):
        run(deep_llama, tmp_path / "out", tmp_path / "layers", [])
    monkeypatch.setattr(resume.ResumeState, "save_activations", real)
    events: list[LayerProgress] = []
    run(deep_llama, tmp_path / "out2", tmp_path / "layers", events)
    assert events[0].resumed_at == 2  # layer 3 (index 2) is computed again, once
    assert shards(tmp_path / "out2") == uninterrupted
