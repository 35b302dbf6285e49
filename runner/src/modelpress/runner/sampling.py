"""Text a causal LM writes itself, at the speed of its own forward pass.

Each step reads only the newest token through the model (the KV cache holds the rest) and samples
from a top-k shortlist, cut to top-p inside it: `topk` touches each row's logits once, where a
full top-p sorts the whole vocabulary every step (49k entries for SmolLM2, half of a CPU step).
Randomness comes from one `torch.Generator`, so the caller's random stream is left alone and a
seed gives the same samples on the same device and batch size.
"""

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TOP_K = 64  # shortlist per step, before top-p cuts it further
TOP_P = 0.95
CPU_BATCH = 64  # sequences per batch on a CPU: SmolLM2 on 2 cores measured 340 tokens/s at 64, 227 at 16
ACCELERATOR_BATCH = 256  # an accelerator's batch, lowered to what a quarter of its free memory holds


@dataclass(frozen=True)
class Rate:
    """How far a generation is, for a progress line: tokens so far, of how many, and how fast."""

    tokens: int
    total: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> int | None:
        return round((self.total - self.tokens) / self.per_second) if self.per_second else None


def next_tokens(logits: torch.Tensor, generator: torch.Generator, top_k: int = TOP_K, top_p: float = TOP_P) -> torch.Tensor:
    """One token per row of [rows, vocab] logits, at temperature 1.

    The shortlist is the `top_k` likeliest tokens; of those, the fewest whose share of the
    shortlist's probability reaches `top_p` are kept (the likeliest always is).
    """
    values, ids = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


def batch_size(device: torch.device, config: Any, length: int) -> int:
    """Sequences per batch: the CPU's measured best, or what fits a quarter of an accelerator's free memory."""
    if device.type == "cpu":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_bytes = 2 * config.num_hidden_layers * heads * head_dim * length * 4  # keys and values, float32
    step_bytes = config.vocab_size * 4 * 3  # the step's logits, their float copy and the shortlist work
    return max(1, min(ACCELERATOR_BATCH, free // 4 // (cache_bytes + step_bytes)))


@torch.no_grad()
def generate(model: Any, start: int, num_samples: int, length: int, seed: int,
             on_progress: Callable[[Rate], None] | None = None) -> list[torch.Tensor]:
    """`num_samples` sequences of exactly `length` tokens, each beginning with `start`.

    An end-of-sequence token does not end a sample: the model goes on as after any document in
    packed training text (a chat model opens its next turn), so every sample is whole and the
    budget, num_samples x (length - 1) sampled tokens, is known up front.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    per_batch = batch_size(device, model.config, length)
    total, done, began = num_samples * (length - 1), 0, time.monotonic()
    samples: list[torch.Tensor] = []
    for first in range(0, num_samples, per_batch):
        rows = min(per_batch, num_samples - first)
        ids = torch.full((rows, length), start, dtype=torch.long, device=device)
        cache = DynamicCache(config=model.config)
        for step in range(1, length):
            logits = model(input_ids=ids[:, step - 1 : step], use_cache=True, **{keyword: cache}).logits[:, -1]
            ids[:, step] = next_tokens(logits, generator)
            done += rows
            if on_progress is not None:
                on_progress(Rate(done, total, time.monotonic() - began))
        samples += [row.unsqueeze(0).cpu() for row in ids]
    return samples
