"""Quality on the real SmolLM2-135M-Instruct: perplexity of each scheme against the float model.

4k tokens of WikiText-2 validation text (from the middle of the file), in 512-token windows;
calibration, where a recipe needs it, comes from its beginning (excerpts in tests/data).
"""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from support.models import WIKITEXT
from modelpress import AWQModifier, GPTQModifier, QuantizationModifier, SmoothQuantModifier, SparseGPTModifier, oneshot
from modelpress.runner.cli import preset_recipe
from modelpress.runner.evaluation import perplexity
from modelpress.runner.smollm2 import smollm2_dir

pytestmark = pytest.mark.quality

EVAL_TOKENS = 4096  # eight windows: each of the tier's nine perplexities costs ~1 s a window on 2 cores


# scheme -> (recipe, allowed relative perplexity increase)
BOUNDS = {
    "W4A16_ASYM-g64": (lambda: preset_recipe("W4A16_ASYM", 64, None), 0.40),
    # Symmetric int4 measured +38..43% here (the source weights are a dequantized Q4_1 GGUF, whose
    # asymmetric 4-bit grid a symmetric grid cannot follow); llm-compressor reports +36% on bf16 weights.
    "W4A16-g64": (lambda: preset_recipe("W4A16", 64, None), 0.50),
    "FP8_DYNAMIC": (lambda: QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"]), 0.05),
}


def held_out_ppl(model: torch.nn.Module, tokenizer, text: str) -> float:
    return perplexity(model, tokenizer, text, max_tokens=EVAL_TOKENS)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def eval_text() -> str:
    return (WIKITEXT / "evaluation.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def calibration() -> dict:
    """16 windows of 512 tokens (the benchmark uses 128) from text the evaluation never sees."""
    return {"dataset": WIKITEXT / "calibration.txt", "num_calibration_samples": 16, "max_seq_length": 512, "device": "cpu"}


@pytest.fixture(scope="module")
def float_ppl(smollm2: Path, tokenizer, eval_text: str) -> float:
    return held_out_ppl(AutoModelForCausalLM.from_pretrained(smollm2), tokenizer, eval_text)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_perplexity_within_bound(name: str, smollm2: Path, tokenizer, eval_text: str, float_ppl: float, tmp_path: Path) -> None:
    recipe, bound = BOUNDS[name]
    out = tmp_path / name
    oneshot(model=smollm2, recipe=recipe(), output_dir=out, device="cpu")
    # weight-only asymmetric checkpoints go through the dequantizing loader; the others through the
    # compressed one, which also quantizes activations per token as vLLM does
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "W4A16" in name else {}
    model = AutoModelForCausalLM.from_pretrained(out, **kwargs)
    ppl = held_out_ppl(model, tokenizer, eval_text)
    print(f"{name}: perplexity {ppl:.2f} vs float {float_ppl:.2f} (+{100 * (ppl / float_ppl - 1):.1f}%)")
    assert float_ppl < ppl <= float_ppl * (1 + bound)
    shutil.rmtree(out)


W4_G64 = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 64}}}


def in_memory(smollm2: Path, recipe, calibration: dict, out: Path | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    oneshot(model=model, recipe=recipe, output_dir=out, **calibration)
    return model


@pytest.fixture(scope="module")
def rtn_w4_ppl(smollm2: Path, tokenizer, eval_text: str) -> float:
    """RTN W4A16 g64 (symmetric), the baseline GPTQ and AWQ must beat."""
    return held_out_ppl(in_memory(smollm2, QuantizationModifier(config_groups=W4_G64, ignore=["lm_head"]), {}), tokenizer, eval_text)


def test_gptq_beats_rtn_and_its_checkpoint_reads_back_the_same(
    smollm2: Path, tokenizer, eval_text: str, float_ppl: float, rtn_w4_ppl: float, calibration: dict, tmp_path: Path
) -> None:
    out = tmp_path / "gptq"
    model = in_memory(smollm2, GPTQModifier(config_groups=W4_G64, ignore=["lm_head"]), calibration, out)
    engine = held_out_ppl(model, tokenizer, eval_text)
    print(f"W4A16 g64: float {float_ppl:.2f}, RTN {rtn_w4_ppl:.2f}, GPTQ {engine:.2f}")
    assert float_ppl < engine < rtn_w4_ppl
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = tokenizer(eval_text[:2000], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-3)


def test_smoothquant_gptq_w8a8_stays_within_two_percent(
    smollm2: Path, tokenizer, eval_text: str, float_ppl: float, calibration: dict, tmp_path: Path
) -> None:
    """Int8 activations per token cost SmolLM2 2.2% on their own, with float weights (the
    benchmark's protocol), and GPTQ only mends the weights; smoothing the activation outliers
    first brings W8A8 near float."""
    out = tmp_path / "w8a8"
    recipe = [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", ignore=["lm_head"])]
    in_memory(smollm2, recipe, calibration, out)
    ppl = held_out_ppl(AutoModelForCausalLM.from_pretrained(out), tokenizer, eval_text)  # activations int8 per token
    print(f"SmoothQuant + GPTQ W8A8: {ppl:.2f} vs float {float_ppl:.2f}")
    assert ppl <= float_ppl * 1.02


@pytest.mark.exhaustive  # 80 s each on 2 cores: `make test-all`
def test_sparsegpt_2of4_beats_magnitude_2of4(smollm2: Path, tokenizer, eval_text: str, calibration: dict) -> None:
    sparse = held_out_ppl(in_memory(smollm2, SparseGPTModifier(mask_structure="2:4", ignore=["lm_head"]), calibration), tokenizer, eval_text)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    with torch.no_grad():
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    w = m.weight.reshape(m.out_features, -1, 4)
                    w.scatter_(-1, w.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    magnitude = held_out_ppl(model, tokenizer, eval_text)
    print(f"2:4 sparsity: SparseGPT {sparse:.2f}, magnitude {magnitude:.2f}")
    assert sparse < magnitude



@pytest.mark.exhaustive  # 80 s each on 2 cores: `make test-all`
def test_awq_beats_rtn(smollm2: Path, tokenizer, eval_text: str, float_ppl: float, rtn_w4_ppl: float, calibration: dict) -> None:
    recipe = [AWQModifier(), QuantizationModifier(config_groups=W4_G64, ignore=["lm_head"])]
    awq = held_out_ppl(in_memory(smollm2, recipe, calibration), tokenizer, eval_text)
    print(f"W4A16 g64: float {float_ppl:.2f}, RTN {rtn_w4_ppl:.2f}, AWQ {awq:.2f}")
    assert float_ppl < awq < rtn_w4_ppl


def test_smoothquant_makes_rtn_w8a8_better(
    smollm2: Path, tokenizer, eval_text: str, float_ppl: float, calibration: dict, tmp_path: Path
) -> None:
    """Both checkpoints are read by the compressed loader, which quantizes activations per token.

    Measured on these 4k tokens: RTN W8A8 +2.3%; SmoothQuant (0.8) + RTN W8A8 +0.6% with these 16
    samples (+1.1% on the benchmark's 8k tokens after 128).
    """
    plain, smoothed = tmp_path / "w8a8", tmp_path / "sq-w8a8"
    in_memory(smollm2, QuantizationModifier(scheme="W8A8", ignore=["lm_head"]), {}, plain)
    recipe = [SmoothQuantModifier(smoothing_strength=0.8), QuantizationModifier(scheme="W8A8", ignore=["lm_head"])]
    in_memory(smollm2, recipe, calibration, smoothed)
    rtn = held_out_ppl(AutoModelForCausalLM.from_pretrained(plain), tokenizer, eval_text)
    sq = held_out_ppl(AutoModelForCausalLM.from_pretrained(smoothed), tokenizer, eval_text)
    print(f"W8A8: float {float_ppl:.2f}, RTN {rtn:.2f}, SmoothQuant + RTN {sq:.2f}")
    assert float_ppl < sq < rtn <= float_ppl * 1.03
    assert sq <= float_ppl * 1.02
