"""Calibration data: a dataset, a file, a list of texts or of token ids turned into token-id samples.

Samples are token-id tensors of shape [1, length]; what the algorithms read from them is
gathered per Linear in statistics.py.
"""

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterable

import torch

from modelpress.engine.errors import ModelPressError

log = logging.getLogger(__name__)

CalibrationData = str | Path | list[str] | list[list[int]] | Any  # Any: a datasets.Dataset


def is_token_ids(record: Any) -> bool:
    return isinstance(record, list) and all(isinstance(t, int) for t in record)


def needs_tokenizer(data: CalibrationData | None) -> bool:
    """Whether turning `data` into samples tokenizes anything: token ids given as they are
    (an input_ids column, or lists of ints) do not, and then no tokenizer is loaded, which
    keeps its tens of MB out of the job's peak."""
    if data is None:
        return False
    if isinstance(data, list):
        return not all(is_token_ids(r) for r in data)
    return not (hasattr(data, "column_names") and "input_ids" in data.column_names)


def calibration_samples(
    data: CalibrationData | None,
    tokenizer: Any,
    num_samples: int,
    max_seq_length: int,
    seed: int = 42,
    text_field: str = "text",
    messages_field: str = "messages",
) -> list[torch.Tensor]:
    """Tokenize `data` into at most `num_samples` shuffled samples of at most `max_seq_length` tokens.

    A plain-text file is one stream, cut into windows of `max_seq_length` tokens; every other
    source is a set of records, one sample each (chat messages go through the chat template).
    """
    if data is None:
        return []
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ModelPressError(f"dataset: {path} is not a file; give a .txt or .jsonl file, a list of texts or token ids, or a Dataset")
        if path.suffix == ".jsonl":
            samples = [_tokenize(r, tokenizer, max_seq_length, text_field, messages_field) for r in _jsonl(path)]
        else:
            samples = _windows(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], max_seq_length)
    elif isinstance(data, list):
        samples = [_tokenize(r, tokenizer, max_seq_length, text_field, messages_field) for r in data]
    elif hasattr(data, "column_names"):
        if "input_ids" in data.column_names:
            samples = [list(r["input_ids"])[:max_seq_length] for r in data]
        else:
            samples = [_tokenize(r, tokenizer, max_seq_length, text_field, messages_field) for r in data]
    else:
        raise ModelPressError(f"dataset: unsupported type {type(data).__name__}; give a path, a list of texts or token ids, or a Dataset")
    samples = [s for s in samples if s]
    random.Random(seed).shuffle(samples)
    if len(samples) < num_samples:
        log.warning("calibration: %d usable samples, fewer than the %d asked for", len(samples), num_samples)
    return [torch.tensor([s], dtype=torch.long) for s in samples[:num_samples]]


def _jsonl(path: Path) -> Iterable[dict]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ModelPressError(f"dataset: {path} line {n} is not JSON ({err.msg})") from None


def _tokenize(record: Any, tokenizer: Any, max_len: int, text_field: str, messages_field: str) -> list[int]:
    if is_token_ids(record):
        return record[:max_len]
    if isinstance(record, str):
        return tokenizer(record, truncation=True, max_length=max_len)["input_ids"]
    if isinstance(record, dict) and record.get(messages_field) is not None:
        text = tokenizer.apply_chat_template(record[messages_field], tokenize=False)
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return tokenizer(record[text_field], truncation=True, max_length=max_len)["input_ids"]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ModelPressError(
        f"dataset: a record has neither a {text_field!r} text nor {messages_field!r} messages (it has {keys}); "
        "set text_field or messages_field"
    )


def _windows(ids: list[int], length: int) -> list[list[int]]:
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
