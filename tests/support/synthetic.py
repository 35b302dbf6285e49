"""A synthetic Llama-style model of any size: random weights written shard by shard, never whole in memory.

For memory benchmarks and tests that need a model bigger than the tiny fixtures: each decoder
layer's tensors are drawn, written into the current shard and dropped, so writing a model of
several GB needs about one shard of memory. The tokenizer is copied from a model directory given.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelpress.engine.weights import TOKENIZER_FILES

TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "chat_template.jinja")


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 dtype: torch.dtype = torch.float32, tied: bool = False) -> dict:
    """config.json of a Llama with these sizes (bos 1, eos 2, as the test tokenizers have them)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def _layer_tensors(config: dict, i: int, dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, inner, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inner, h), "mlp.up_proj": (inner, h), "mlp.down_proj": (h, inner),
    }
    prefix = f"model.layers.{i}."
    out = {f"{prefix}{name}.weight": _normal(shape, shape[1], dtype, generator) for name, shape in shapes.items()}
    out[f"{prefix}input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out[f"{prefix}post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def _normal(shape: tuple[int, int], fan_in: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Weights with unit-variance outputs for unit-variance inputs, so activations stay finite through the layers."""
    return (torch.randn(shape, generator=generator) / fan_in**0.5).to(dtype)


def write_synthetic_llama(out: Path, config: dict, tokenizer_from: Path, shard_bytes: int = 256 << 20, seed: int = 0) -> Path:
    """Write the model of `config` to `out`: random weights in shards of about `shard_bytes`, with an index."""
    dtype = getattr(torch, config["dtype"])
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    h, vocab = config["hidden_size"], config["vocab_size"]
    pieces = [lambda: {"model.embed_tokens.weight": _normal((vocab, h), h, dtype, generator)}]
    pieces += [lambda i=i: _layer_tensors(config, i, dtype, generator) for i in range(config["num_hidden_layers"])]
    tail = {"model.norm.weight": torch.ones(h, dtype=dtype)}
    if not config["tie_word_embeddings"]:
        pieces.append(lambda: {"lm_head.weight": _normal((vocab, h), h, dtype, generator)})
    pieces.append(lambda: tail)
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[0]})
        files.append(name)
        shards[0] = {}

    for piece in pieces:
        tensors = piece()
        if shards[0] and sum(t.nbytes for t in shards[0].values()) + sum(t.nbytes for t in tensors.values()) > shard_bytes:
            flush()
        shards[0].update(tensors)
        total += sum(t.nbytes for t in tensors.values())
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return out
