"""The checkpoints load in transformers' compressed-tensors reader and reproduce the engine's weights."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from support.models import CORPUS
from modelpress import QuantizationModifier, oneshot
from modelpress.engine.awq import AWQModifier
from modelpress.engine.gptq import GPTQModifier
from modelpress.engine.modifier import Modifier
from modelpress.engine.smoothing import SmoothingModifier
from modelpress.engine.smoothquant import SmoothQuantModifier
from modelpress.engine.sparsegpt import SparseGPTModifier

warnings.filterwarnings("ignore", message="You passed `quantization_config`")

INT4_CHANNEL = {"num_bits": 4, "type": "int", "strategy": "channel"}
SCHEMES = {
    "W4A16": {"scheme": "W4A16"},
    "W4A16_ASYM": {"scheme": "W4A16_ASYM"},
    "W8A16": {"scheme": "W8A16"},
    "W8A8": {"scheme": "W8A8"},
    "FP8": {"scheme": "FP8"},
    "FP8_DYNAMIC": {"scheme": "FP8_DYNAMIC"},
    "int4-channel-sym": {"config_groups": {"g": {"targets": ["Linear"], "weights": {**INT4_CHANNEL, "symmetric": True}}}},
    "int4-channel-asym": {"config_groups": {"g": {"targets": ["Linear"], "weights": {**INT4_CHANNEL, "symmetric": False}}}},
    "int4-g64-mse": {
        "weight_observer": "mse",
        "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 64}}},
    },
}
G64 = {"num_bits": 4, "strategy": "group", "group_size": 64}
RECIPES = {name: [QuantizationModifier(ignore=["lm_head"], **kw)] for name, kw in SCHEMES.items()} | {
    "GPTQ-W4A16": [GPTQModifier(scheme="W4A16", ignore=["lm_head"], block_size=32)],
    "GPTQ-W8A8": [GPTQModifier(scheme="W8A8", ignore=["lm_head"])],
    "GPTQ-int4-g64-asym-no-actorder": [
        GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": {**G64, "symmetric": False}}}, actorder=None, ignore=["lm_head"])
    ],
    "GPTQ-int4-g64-asym-group-aware-imatrix": [
        GPTQModifier(
            config_groups={"g": {"targets": ["Linear"], "weights": {**G64, "symmetric": False}}},
            actorder="group_aware",
            weight_observer="imatrix_mse",
            ignore=["lm_head"],
        )
    ],
    "GPTQ-FP8": [GPTQModifier(scheme="FP8", ignore=["lm_head"])],
    "SmoothQuant+GPTQ-W8A8": [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", ignore=["lm_head"])],
    "SmoothQuant+W8A8": [SmoothQuantModifier(), QuantizationModifier(scheme="W8A8", ignore=["lm_head"])],
    "SmoothQuant+FP8": [SmoothQuantModifier(), QuantizationModifier(scheme="FP8", ignore=["lm_head"])],
    "SmoothQuant+FP8_DYNAMIC": [SmoothQuantModifier(), QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"])],
    "AWQ+W4A16_ASYM": [AWQModifier(n_grid=8), QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"])],
    "SparseGPT-2:4+GPTQ-W4A16": [
        SparseGPTModifier(mask_structure="2:4", ignore=["lm_head"]),
        GPTQModifier(scheme="W4A16", ignore=["lm_head"]),
    ],
}
FORMAT_TENSORS = {
    "pack-quantized": ("weight_packed", torch.int32),
    "int-quantized": ("weight", torch.int8),
    "float-quantized": ("weight", torch.float8_e4m3fn),
}


def compress_both_ways(model_dir: Path, out: Path, recipe: list[Modifier]) -> torch.nn.Module:
    """Write the checkpoint (streamed from disk), and return the engine's in-memory quantized model."""
    oneshot(model=model_dir, recipe=recipe, dataset=CORPUS, output_dir=out, device="cpu", max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    in_memory = oneshot(model=model, recipe=recipe, dataset=CORPUS, device="cpu", max_seq_length=32)
    assert in_memory.model is model
    return model


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_loader_reproduces_engine_weights(tiny_model: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    engine = compress_both_ways(tiny_model, out, RECIPES[name])
    original = AutoModelForCausalLM.from_pretrained(tiny_model)

    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["quantization_status"] == "compressed"
    assert qconfig["ignore"] == ["lm_head"]
    tensor_name, dtype = FORMAT_TENSORS[qconfig["format"]]

    loaded, info = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.endswith(".input_scale") for k in info["unexpected_keys"])  # a dense model has no activation quant
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = [n for n, m in engine.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(quantized) == 14
    for layer in quantized:
        got = loaded.get_submodule(layer).weight
        want = engine.get_submodule(layer).weight
        assert torch.equal(got, want), layer
        assert not torch.equal(want, original.get_submodule(layer).weight), f"{layer} was not quantized"
        with safe_open(out / index[f"{layer}.{tensor_name}"], "pt") as f:
            assert f.get_tensor(f"{layer}.{tensor_name}").dtype == dtype
            if name.endswith("FP8"):
                assert f.get_tensor(f"{layer}.input_scale").item() > 0
        if name.startswith("SparseGPT-2:4"):  # two of every four inputs stay zero through quantization
            assert ((got.reshape(got.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), layer
    smoothed = any(isinstance(m, SmoothingModifier) for m in RECIPES[name])
    changed = []
    for n, p in original.named_parameters():  # everything not quantized is copied (smoothing rescales norms)
        if not any(n.startswith(q + ".") for q in quantized):
            assert torch.equal(loaded.get_parameter(n), engine.get_parameter(n)), n
            if not torch.equal(p, engine.get_parameter(n)):
                changed.append(n)
    assert bool(changed) == smoothed and all("norm" in n for n in changed), changed

    ids = torch.tensor([[1, 5, 9, 13]])
    greedy = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert greedy.shape == (1, 10)
    assert torch.equal(greedy, engine.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "SmoothQuant+GPTQ-W8A8", "SmoothQuant+FP8"])
def test_default_loader_runs_compressed_checkpoint(llama_dir: Path, tmp_path: Path, name: str) -> None:
    """The path vLLM-like readers take: compressed modules, decompressed on first use."""
    out = tmp_path / "out"
    engine = compress_both_ways(llama_dir, out, RECIPES[name])
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        got, want = loaded(ids).logits, engine(ids).logits
    if name in ("W4A16", "W8A16"):  # weight-only: the same arithmetic
        assert torch.allclose(got, want, atol=1e-5)
    else:  # the reader also quantizes activations per token, which the engine's model does not
        assert torch.allclose(got, want, atol=0.1)
    for n, m in loaded.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            assert torch.equal(m.weight, engine.get_submodule(n).weight), n


def test_small_shards_and_tied_embeddings(tmp_path: Path, tokenizer_dir: Path) -> None:
    from support.models import make_model

    src = make_model("llama", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True)
    out = tmp_path / "out"
    oneshot(model=src, recipe=QuantizationModifier(scheme="W8A16", ignore=["lm_head"]), output_dir=out, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "recipe.yaml"):
        assert (out / name).is_file(), name


def test_quantized_tied_head_is_untied(tmp_path: Path, tokenizer_dir: Path) -> None:
    from support.models import make_model

    src = make_model("llama", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True)
    out = tmp_path / "out"
    result = oneshot(model=src, recipe=QuantizationModifier(scheme="W8A16"), output_dir=out)
    assert result.quantized_modules == 15
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    original = AutoModelForCausalLM.from_pretrained(src)
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(loaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(loaded.lm_head.weight, original.lm_head.weight)


def test_a_loaded_model_with_a_quantized_tied_head_is_untied_in_its_config_too(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The head gets its own copy before it is quantized, and the model's own config says so:
    the saved config.json is written from it, and a later save of the model must not tie the
    quantized head back onto the embeddings."""
    from support.models import make_model

    src = make_model("llama", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    out = tmp_path / "out"
    result = oneshot(model=model, recipe=QuantizationModifier(scheme="W8A16"), output_dir=out)
    assert result.quantized_modules == 15
    assert model.config.tie_word_embeddings is False
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # only the head was quantized
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, embeddings)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, embeddings)


def test_untying_a_module_from_the_embeddings_records_it_in_the_config(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Smoothing and the head's quantization untie through one helper; the config it changes is the
    one the checkpoint writer saves."""
    from support.models import make_model
    from modelpress.engine.weights import untie_from_embeddings

    model = AutoModelForCausalLM.from_pretrained(make_model("llama", tmp_path / "tied", tokenizer_dir, tie_word_embeddings=True))
    untie_from_embeddings(model, ["model.layers.0.self_attn.q_proj"])  # not tied: nothing changes
    assert model.config.tie_word_embeddings is True and model.lm_head.weight is model.model.embed_tokens.weight
    untie_from_embeddings(model, ["lm_head"])
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
