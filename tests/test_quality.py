"""Quality on the real SmolLM2-135M-Instruct: perplexity of each scheme against the float model.

8k tokens of WikiText-2 validation text (second half of the file), in 512-token windows. When the
file is absent, the float model writes its own evaluation text.
"""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from conftest import WIKITEXT
from modelpress import QuantizationModifier, oneshot
from modelpress.runner.cli import preset_recipe
from modelpress.runner.evaluation import perplexity, text_slice
from modelpress.runner.smollm2 import smollm2_dir

pytestmark = pytest.mark.quality


# scheme -> (recipe, allowed relative perplexity increase)
BOUNDS = {
    "W4A16_ASYM-g64": (lambda: preset_recipe("W4A16_ASYM", 64, None), 0.40),
    # Symmetric int4 measured +38..43% here (the source weights are a dequantized Q4_1 GGUF, whose
    # asymmetric 4-bit grid a symmetric grid cannot follow); llm-compressor reports +36% on bf16 weights.
    "W4A16-g64": (lambda: preset_recipe("W4A16", 64, None), 0.50),
    "W8A8": (lambda: QuantizationModifier(scheme="W8A8", ignore=["lm_head"]), 0.03),
    "FP8_DYNAMIC": (lambda: QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"]), 0.05),
}


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def eval_text(smollm2: Path, tokenizer) -> str:
    if WIKITEXT.is_file():
        return text_slice(WIKITEXT, 0.5)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    torch.manual_seed(0)
    ids = model.generate(torch.tensor([[tokenizer.bos_token_id or 1]]), max_new_tokens=2048, do_sample=True, top_p=0.95)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


@pytest.fixture(scope="module")
def float_ppl(smollm2: Path, tokenizer, eval_text: str) -> float:
    return perplexity(AutoModelForCausalLM.from_pretrained(smollm2), tokenizer, eval_text)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_perplexity_within_bound(name: str, smollm2: Path, tokenizer, eval_text: str, float_ppl: float, tmp_path: Path) -> None:
    recipe, bound = BOUNDS[name]
    out = tmp_path / name
    oneshot(model=smollm2, recipe=recipe(), output_dir=out, device="cpu")
    # weight-only asymmetric checkpoints go through the dequantizing loader; the others through the
    # compressed one, which also quantizes activations per token as vLLM does
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "W4A16" in name else {}
    model = AutoModelForCausalLM.from_pretrained(out, **kwargs)
    ppl = perplexity(model, tokenizer, eval_text)
    print(f"{name}: perplexity {ppl:.2f} vs float {float_ppl:.2f} (+{100 * (ppl / float_ppl - 1):.1f}%)")
    assert float_ppl < ppl <= float_ppl * (1 + bound)
    shutil.rmtree(out)
