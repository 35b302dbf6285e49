"""The one-pass, true-sequential path: it reproduces the layer, runs each part once per sample, and
steps aside for layers it does not know."""

import json
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from support.models import CORPUS, first_layer_inputs
from modelpress import QuantizationModifier, oneshot
from modelpress.engine.gptq import GPTQModifier
from modelpress.engine.modifier import LayerState
from modelpress.engine.sparsegpt import SparseGPTModifier
from modelpress.engine.activations import Storage
from modelpress.engine.pipeline import capture_first_layer_inputs, compress_layer_sequential, run_layer
from modelpress.engine.layer_pass import find_parts, reproduces_layer
from modelpress.engine.weights import find_decoder_layers


def test_split_reproduces_each_architecture(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    layers, inputs = first_layer_inputs(tiny_model, model)
    parts = find_parts(layers[0])
    assert parts is not None
    assert parts.groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert reproduces_layer(layers[0], parts, inputs.sample(0))


def test_outputs_are_the_compressed_layers_outputs(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    layers, inputs = first_layer_inputs(llama_dir, model)
    original = [((args[0].clone(), *args[1:]), kwargs) for args, kwargs in map(inputs.sample, range(len(inputs)))]
    modifier = GPTQModifier(scheme="W4A16", ignore=["lm_head"], block_size=32, config_groups=None)
    plan = modifier.plan(model)
    before = layers[0].self_attn.q_proj.weight.clone()
    state = LayerState()
    done = compress_layer_sequential(layers[0], "model.layers.0.", [modifier], [plan], inputs, state, False, Storage())
    assert done is not None and len(done) == 7
    assert not torch.equal(before, layers[0].self_attn.q_proj.weight)
    assert set(state.losses) == set(done) and all(v > 0 for v in state.losses.values())
    expected = run_layer(layers[0], original)  # the already-compressed layer, run whole
    for (got, _), (want, _) in zip(map(inputs.sample, range(len(inputs))), expected):
        assert torch.allclose(got[0], want[0], atol=1e-5)


def test_each_part_runs_once_per_sample_for_a_whole_stage(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    calls = {"attn": 0, "mlp": 0}
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    recipe = [SparseGPTModifier(mask_structure="2:4", ignore=["lm_head"]), GPTQModifier(scheme="W4A16", ignore=["lm_head"])]
    samples = 8
    result = oneshot(model=model, recipe=recipe, dataset=CORPUS, num_calibration_samples=samples, max_seq_length=32)
    assert all(r.sequential for r in result.layers)
    layers = len(result.layers)
    # per layer: attention once per sample, the token-wise MLP once over all tokens, and each
    # twice more on one sample to check the split (whole layer, then split)
    assert calls == {"attn": layers * (samples + 2), "mlp": layers * (1 + 2)}


def test_unknown_layer_layout_takes_the_generic_path(llama_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    layer = model.model.layers[0]
    plain = layer.forward

    def scaled(self, *args, **kwargs):  # a residual the split knows nothing about
        return plain(*args, **kwargs) * 0.5

    layer.forward = types.MethodType(scaled, layer)
    result = oneshot(model=model, recipe=GPTQModifier(scheme="W8A16", ignore=["lm_head"]), dataset=CORPUS, max_seq_length=32)
    assert [r.sequential for r in result.layers] == [False, True]
    assert all(r.losses for r in result.layers)


def test_sparsegpt_alone_writes_a_dense_checkpoint_with_its_sparsity(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    oneshot(
        model=llama_dir,
        recipe=SparseGPTModifier(sparsity=0.6, ignore=["lm_head"]),
        dataset=CORPUS,
        max_seq_length=32,
        output_dir=out,
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    report = json.loads((out / "modelpress-report.json").read_text())
    assert report["mean_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert len(report["layers"]) == 2 and len(report["layers"][0]["sparsity"]) == 7
    loaded = AutoModelForCausalLM.from_pretrained(out)
    w = loaded.model.layers[1].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert "SparseGPTModifier" in (out / "recipe.yaml").read_text()


def test_quantization_after_pruning_is_one_owner_each(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    recipe = [QuantizationModifier(scheme="W8A16", ignore=["lm_head"]), GPTQModifier(scheme="W4A16", ignore=["lm_head"])]
    with pytest.raises(ValueError, match="quantized by both QuantizationModifier and GPTQModifier"):
        oneshot(model=model, recipe=recipe, dataset=CORPUS, max_seq_length=32)


def test_samples_of_one_length_share_their_position_tensors(llama_dir: Path) -> None:
    """Captured layer-0 arguments keep one copy of equal position tensors; the layer's output is unchanged."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    _, layers = find_decoder_layers(model)
    ids = [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13, 14, 15, 16]]), torch.tensor([[5, 6, 7]])]
    inputs = capture_first_layer_inputs(model, layers[0], ids, torch.device("cpu"))
    (_, first), (_, second), (_, short) = inputs
    assert first["position_embeddings"][0] is second["position_embeddings"][0]
    assert first["position_ids"] is second["position_ids"]
    assert short["position_embeddings"][0] is not first["position_embeddings"][0]
    assert short["position_embeddings"][0].shape[-2] == 3
    with torch.no_grad():
        alone = model.model(input_ids=ids[1], output_hidden_states=True).hidden_states[1]
    assert torch.allclose(run_layer(layers[0], inputs)[1][0][0], alone, atol=1e-6)
