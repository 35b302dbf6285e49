"""The model card says how to load each output outside vLLM, and the code it shows runs as written."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from modelpress.contract import CompressionJob, RecipeRef, ResultEvent, Sizes, Metrics
from modelpress.engine.recipe import parse_recipe, recipe_yaml
from modelpress.runner.model_card import model_card
from modelpress.runner.presets import preset_document
from modelpress.runner.run import untied_head_bytes

SPARSE_ONLY = {"sparsity_stage": {"sparsity_modifiers": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}}}


def card_parts(recipe: dict, output: str = "s3://models/m") -> tuple[CompressionJob, ResultEvent, str]:
    job = CompressionJob.model_validate({
        "apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "hf://org/model"}, "recipe": {"preset": "W4A16", "algorithm": "RTN"},
                 "output": {"uri": output, "connection": "models"} if output.startswith("s3://") else {"uri": output}},
    })
    result = ResultEvent(recipe=RecipeRef(summary="a recipe", modifiers=[]), metrics=Metrics(), answers=[], versions={},
                         sizes=Sizes(original_bytes=100, compressed_bytes=25, ratio=4.0))
    return job, result, recipe_yaml(parse_recipe(recipe))


def card(recipe: dict, output: str = "s3://models/m") -> str:
    return model_card(*card_parts(recipe, output))


def python_block(text: str) -> str:
    section = text.split("## Load it outside vLLM", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("algorithm", ["RTN", "GPTQ", "AWQ"])
def test_asymmetric_int4_is_loaded_dequantized(algorithm: str) -> None:
    text = card(preset_document("W4A16_ASYM", algorithm, ["lm_head"]))
    code = python_block(text)
    assert 'from_pretrained("m", quantization_config=CompressedTensorsConfig(dequantize=True))' in code
    assert code.count("from_pretrained(") == 1  # the compressed loader is not offered: it refuses these
    assert "refuses them with a size mismatch on `weight_zero_point`" in text and "transformers 5.24" in text
    compile(code, "card", "exec")


@pytest.mark.parametrize("preset", ["W4A16", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC"])
def test_other_schemes_load_compressed_or_dequantized(preset: str) -> None:
    text = card(preset_document(preset, "RTN", ["lm_head"]))
    code = python_block(text)
    assert 'model = AutoModelForCausalLM.from_pretrained("m")  # needs the compressed-tensors package' in code
    assert "dequantize=True" in code and "zero_point" not in text
    compile(code, "card", "exec")


def test_a_pruned_model_loads_as_plain_transformers() -> None:
    code = python_block(card(SPARSE_ONLY))
    assert code.strip().endswith('model = AutoModelForCausalLM.from_pretrained("m")')
    assert "CompressedTensorsConfig" not in code


def test_the_snippet_loads_the_directory_the_serve_command_serves(tmp_path) -> None:
    for output, where in (("s3://models/m", "m"), ("pvc://claim/models/m", "/mnt/models"), (str(tmp_path / "out"), str(tmp_path / "out"))):
        text = card(preset_document("W4A16", "RTN", ["lm_head"]), output)
        assert f"vllm serve {where}\n" in text
        assert f'from_pretrained("{where}")' in python_block(text)


def test_an_untied_head_is_stated_with_its_size(tmp_path) -> None:
    source, output = tmp_path / "source", tmp_path / "output"
    for folder, tied in ((source, True), (output, False)):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    save_file({"lm_head.weight": torch.zeros(320, 64, dtype=torch.bfloat16), "model.embed_tokens.weight": torch.zeros(320, 64)},
              output / "model.safetensors")
    assert untied_head_bytes(source, output) == 320 * 64 * 2
    assert untied_head_bytes(output, output) is None  # not tied in the source: nothing was added
    text = model_card(*card_parts(SPARSE_ONLY), untied_head_bytes=40960)
    assert "the head is stored as its own tensor: 40.0 KiB (40,960 bytes)" in text


def served_card(served: dict, served_nll: dict | None) -> str:
    job = CompressionJob.model_validate({
        "apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "hf://org/model"}, "recipe": {"preset": "W4A16", "algorithm": "RTN"}, "output": {"uri": "/tmp/m"}},
    })
    result = ResultEvent.model_validate({"recipe": {"summary": "RTN W4A16", "modifiers": []}, "answers": [], "versions": {},
                                         "sizes": {"originalBytes": 100, "compressedBytes": 25, "ratio": 4.0},
                                         "metrics": {"servedNll": served_nll} if served_nll else {}, "served": served})
    return model_card(job, result, recipe_yaml(parse_recipe(preset_document("W4A16", "RTN", ["lm_head"]))))


def test_the_card_says_what_vllm_made_of_the_output() -> None:
    text = served_card({"servedBy": "vllm 0.32.0", "loaded": True, "tokens": 630, "quantization": "compressed-tensors",
                        "kernels": ["CPUWNA16LinearKernel"], "answers": [{"prompt": "Capital of France?", "answer": "Paris."}]},
                       {"vllm": 3.37524, "transformers": 3.38028, "relativeDifference": -0.001489, "bound": 0.003, "passed": True})
    section = text.split("## Served by vLLM", 1)[1].split("## Recipe", 1)[0]
    assert "Loaded by vllm 0.32.0 (compressed-tensors, CPUWNA16LinearKernel) before it was published" in section
    assert "| 630 tokens | 3.3752 | 3.3803 | -0.15% (bound ±0.3%) |" in section
    assert "**Capital of France?**\n\n- vLLM: Paris." in section


def test_the_card_of_an_output_vllm_refused_says_why_and_a_card_without_the_stage_says_nothing() -> None:
    refused = served_card({"servedBy": "vllm 0.32.0", "loaded": False, "reason": "ValueError: Quant type (uint8b128) not supported"}, None)
    assert "## Served by vLLM\n\nvllm 0.32.0 could not load or run this output: ValueError: Quant type (uint8b128) not supported" in refused
    assert "Served by vLLM" not in card(preset_document("W4A16", "RTN", ["lm_head"]))


def test_the_card_says_how_vllm_serves_the_preset() -> None:
    from modelpress.contract import PRESETS
    from modelpress.runner.presets import SERVED_AS

    assert set(SERVED_AS) == set(PRESETS)
    text = card(preset_document("W4A16", "RTN", ["lm_head"]))
    assert "vLLM serves it as uint4b8 (symmetric int4 groups, no zero points): CPUWNA16 on CPU, Marlin on GPU." in text
