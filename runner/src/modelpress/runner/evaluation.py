"""Evaluation: perplexity on held-out text, and greedy answers to prompts."""

import math
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str, max_tokens: int = 8192, seq_len: int = 512) -> float:
    """exp(mean next-token NLL) over the first `max_tokens` tokens, in independent windows."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:max_tokens]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += loss.item()
        count += window.shape[1] - 1
    return math.exp(nll / count)


def text_slice(path: Path, start_fraction: float = 0.5, chars: int = 200_000) -> str:
    """A stretch of a text file, so evaluation can avoid the part used for calibration."""
    text = path.read_text(encoding="utf-8")
    start = int(len(text) * start_fraction)
    return text[start : start + chars]


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """What the model is given for a prompt: a user turn through the chat template, when the tokenizer has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy answer, through the chat template when the tokenizer has one."""
    ids = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=not tokenizer.chat_template)["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
