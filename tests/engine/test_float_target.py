"""GPTQ aimed at the float model's output: the moved target, the cross statistic, the float stream
the layer pass carries beside the compressed one, and what the recipe refuses."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress import GPTQModifier, oneshot
from modelpress.engine.activations import Storage
from modelpress.engine.errors import ModelPressError
from modelpress.engine.gptq import float_target
from modelpress.engine.modifier import LayerState, plan_recipe
from modelpress.engine.pipeline import carry_float, compress_layer_sequential, run_layer
from modelpress.engine.smoothquant import SmoothQuantModifier
from modelpress.engine.statistics import group_stats
from support.models import CORPUS, first_layer_inputs, make_model

W4 = dict(scheme="W4A16", ignore=["lm_head"], block_size=32)


def test_the_moved_target_is_the_least_squares_fit_to_the_float_output() -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 24, dtype=torch.float64)  # the compressed model's inputs, [tokens, in]
    x_float = x + 0.1 * torch.randn_like(x) @ torch.randn(24, 24, dtype=torch.float64)
    w = torch.randn(10, 24, dtype=torch.float64)
    hessian = 2 * x.T @ x / len(x)
    drift = 2 * (x_float - x).T @ x / len(x)
    moved = float_target(w, hessian, drift, 1.0, dampening_frac=1e-9)
    # argmin_Q ||x Q^T - x_float W^T||: the weight whose output on x is nearest the float output
    best = torch.linalg.lstsq(x, x_float @ w.T).solution.T
    assert torch.allclose(moved, best, atol=1e-6)
    assert torch.allclose(float_target(w, hessian, drift, 0.5, 1e-9), (w + best) / 2, atol=1e-6)
    assert torch.equal(float_target(w, hessian, drift, 0.0), w)
    assert (w @ x_float.T - best @ x.T).norm() < (w @ x_float.T - w @ x.T).norm()


def test_the_cross_statistic_is_the_direct_product_over_pieces() -> None:
    torch.manual_seed(1)
    x, x_float = torch.randn(300, 16), torch.randn(300, 16)
    pieces = lambda t: lambda: iter(t.split(64))  # noqa: E731
    stats = group_stats(pieces(x), True, False, pieces(x_float))
    assert torch.allclose(stats.drift, 2 * (x_float - x).T @ x / 300, atol=1e-5)
    with pytest.raises(RuntimeError, match="do not match"):
        group_stats(pieces(x), True, False, lambda: iter(x_float[:, :8].split(64)))


def test_the_float_stream_follows_the_float_layer_while_the_compressed_one_follows_the_compressed(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    layers, inputs = first_layer_inputs(llama_dir, model)
    carry_float(inputs, Storage())
    samples = [((args[0].clone(), *args[1:]), kwargs) for args, kwargs in map(inputs.sample, range(len(inputs)))]
    float_layer = copy.deepcopy(layers[0])
    modifier = GPTQModifier(**W4, float_target=0.5)
    done = compress_layer_sequential(layers[0], "model.layers.0.", [modifier], [modifier.plan(model)], inputs, LayerState(),
                                     False, Storage(), float_layer)
    assert done is not None and len(done) == 7
    want_float = run_layer(float_layer, samples)
    want_compressed = run_layer(layers[0], samples)
    floats = inputs.float_hidden
    assert floats is not None
    for i, ((f, _), (q, _)) in enumerate(zip(want_float, want_compressed)):
        lo, hi = inputs.bounds[i], inputs.bounds[i + 1]
        assert torch.allclose(floats.read(lo, hi), f[0], atol=1e-5)
        assert torch.allclose(inputs.hidden.read(lo, hi), q[0], atol=1e-5)
    assert not torch.allclose(floats.read(0, inputs.bounds[1]), inputs.hidden.read(0, inputs.bounds[1]), atol=1e-3)


def test_aiming_at_the_float_output_moves_exactly_the_linears_whose_inputs_drifted(llama_dir: Path) -> None:
    """Layer 0's q/k/v read the float model's own input (no drift: their weights are plain GPTQ's, bit
    for bit); every later Linear reads inputs the compressed ones before it moved, and is aimed elsewhere.
    (Whether that helps is measured on SmolLM2 in bench/, not on a random model.)"""
    weights = {}
    for alpha in (0.0, 0.5):
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        result = oneshot(model=model, recipe=GPTQModifier(**W4, float_target=alpha), dataset=CORPUS, num_calibration_samples=16,
                         max_seq_length=32)
        assert all(r.sequential for r in result.layers)
        weights[alpha] = {n: m.weight.detach().clone() for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    first = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    for name, plain in weights[0.0].items():
        assert torch.equal(plain, weights[0.5][name]) == (name in first), name


def test_float_target_is_refused_beside_smoothing_and_outside_zero_to_one(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ModelPressError, match="GPTQModifier.float_target: not with SmoothQuantModifier"):
        plan_recipe([SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(**W4, float_target=0.5)], model)
    plan_recipe([SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(**W4)], model)
    with pytest.raises(ModelPressError, match="float_target"):
        GPTQModifier(**W4, float_target=1.5)


def test_float_target_is_refused_on_a_layer_the_pass_does_not_split(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_model("mixtral", tmp_path, tokenizer_dir))
    with pytest.raises(ModelPressError, match=r"float_target: decoder layer 0 \(MixtralDecoderLayer\)"):
        GPTQModifier(**W4, float_target=0.5).plan(model)


def test_a_killed_float_target_run_resumes_with_its_float_stream_to_the_same_bytes(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelpress.engine import gptq

    recipe = GPTQModifier(**W4, float_target=0.5)
    run = lambda out, resume, events: oneshot(model=llama_dir, recipe=recipe, dataset=CORPUS, num_calibration_samples=8,  # noqa: E731
                                              max_seq_length=32, output_dir=out, progress=events.append, resume_dir=resume)
    run(tmp_path / "whole", None, [])
    real, calls = gptq.gptq, {"n": 0}

    def dies_in_layer_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq", dies_in_layer_two)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "a", tmp_path / "layers", [])
    monkeypatch.setattr(gptq, "gptq", real)
    assert sorted(p.name for p in (tmp_path / "layers").glob("activations-*")) == ["activations-00000-float.bin", "activations-00000.bin"]
    events: list = []
    run(tmp_path / "b", tmp_path / "layers", events)
    assert events[0].resumed_at == 1
    digest = lambda d: {p.name: p.read_bytes() for p in d.glob("*.safetensors")}  # noqa: E731
    assert digest(tmp_path / "b") == digest(tmp_path / "whole")


def test_both_streams_spilled_to_disk_give_the_bytes_of_an_in_memory_run(llama_dir: Path, tmp_path: Path) -> None:
    recipe = GPTQModifier(**W4, float_target=0.5)
    kept = {}
    for storage in ("memory", "disk"):
        out = tmp_path / storage
        oneshot(model=llama_dir, recipe=recipe, dataset=CORPUS, num_calibration_samples=8, max_seq_length=32, output_dir=out,
                activation_storage=storage, spill_dir=tmp_path / "spill")
        kept[storage] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert kept["disk"] == kept["memory"]
    assert list((tmp_path / "spill").iterdir()) == []  # both streams' pieces removed


def test_a_kill_between_the_two_activation_files_resumes_from_the_previous_pair(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelpress.engine import resume

    model = make_model("llama", tmp_path / "m", tokenizer_dir, num_hidden_layers=4)
    recipe = GPTQModifier(**W4, float_target=0.5)
    run = lambda out, events: oneshot(model=model, recipe=recipe, dataset=CORPUS, num_calibration_samples=8,  # noqa: E731
                                      max_seq_length=32, output_dir=out, progress=events.append, resume_dir=tmp_path / "layers")
    real, written = resume._write_rows, []

    def dies_on_the_second_float_file(rows, path: Path) -> None:
        written.append(path.name)
        if path.name == "activations-00001-float.bin":
            raise RuntimeError("killed")  # layer 1's compressed rows are written, its float rows are not
        real(rows, path)

    monkeypatch.setattr(resume, "_write_rows", dies_on_the_second_float_file)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "a", [])
    monkeypatch.setattr(resume, "_write_rows", real)
    assert written[-2:] == ["activations-00001.bin", "activations-00001-float.bin"]
    events: list = []
    run(tmp_path / "b", events)
    assert events[0].resumed_at == 1  # layer 1 is redone from layer 0's pair, not from a half-written set
    oneshot(model=model, recipe=recipe, dataset=CORPUS, num_calibration_samples=8, max_seq_length=32, output_dir=tmp_path / "whole")
    digest = lambda d: {p.name: p.read_bytes() for p in d.glob("*.safetensors")}  # noqa: E731
    assert digest(tmp_path / "b") == digest(tmp_path / "whole")
