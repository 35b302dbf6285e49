"""Shared fixtures: tiny random models of several architectures, built offline in seconds."""

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to a few integer levels.",
    "A decoder layer has attention and a feed-forward block.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
] * 20

ARCHS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}
# further layouts (Gemma's 1 + w norms, Phi-3's fused projections, MoE), used where a test asks
MORE_ARCHS = {
    "qwen3": Qwen3Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "phi3": Phi3Config,
    "mixtral": MixtralConfig,
    "qwen2_moe": Qwen2MoeConfig,
}
REPO = Path(__file__).resolve().parents[2]
WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2"  # calibration.txt and evaluation.txt


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def make_model(arch: str, out: Path, tokenizer_dir: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Save a random 2-layer model of `arch` (with the tiny tokenizer) to `out`."""
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    model = AutoModelForCausalLM.from_config({**ARCHS, **MORE_ARCHS}[arch](**kwargs), dtype=dtype)
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# `make test` runs the architecture matrix on Llama; `make test-all` on every layout in ARCHS.
ARCH_PARAMS = [pytest.param(a, marks=() if a == "llama" else pytest.mark.exhaustive) for a in sorted(ARCHS)]


@pytest.fixture(scope="session", params=ARCH_PARAMS)
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("llama"), tokenizer_dir)


def first_layer_inputs(model_dir: Path, model: torch.nn.Module, samples: int = 6):
    """The model's decoder layers, and layer 0's calibration inputs from CORPUS (32-token samples)."""
    from modelpress.engine.activations import Storage
    from modelpress.engine.calibration import calibration_samples
    from modelpress.engine.pipeline import capture_calibration
    from modelpress.engine.weights import find_decoder_layers

    ids = calibration_samples(CORPUS, AutoTokenizer.from_pretrained(model_dir), samples, 32)
    _, layers = find_decoder_layers(model)
    return layers, capture_calibration(model, layers[0], ids, torch.device("cpu"), Storage())
