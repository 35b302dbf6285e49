"""Calibration and evaluation data from every source a job may name, in the shapes the engine reads.

Sources: a hub dataset (`hf://name`, with split and subset), a `.jsonl`, `.parquet` or `.txt` file
on disk, on a PVC or in S3, or `self-generated`: the model samples its own text from a neutral
start, for clusters with no route to a dataset hub. Tokenizing, chat templates, shuffling and
truncation are the engine's (`calibration_samples`); this module only finds and opens the data.
"""

import json
from pathlib import Path
from typing import Any, Callable

import torch

from modelpress.contract import parse_uri
from modelpress.engine.calibration import CalibrationData, calibration_samples
from modelpress.engine.errors import ModelPressError
from modelpress.runner.sampling import Rate, generate

FILE_TYPES = (".jsonl", ".parquet", ".txt")
SELF_GENERATED_MAX_LENGTH = 512  # tokens per self-generated sample: the generation budget


def open_dataset(
    uri: str, split: str, subset: str | None, field_path: str, local: Callable[[str], Path], token: str | None = None
) -> CalibrationData:
    """A hub dataset split, or a file found through `local` (which fetches s3:// and maps pvc://)."""
    location = parse_uri(uri)
    if location.scheme == "hf":
        return _hub_dataset(location.root, subset, split, field_path, token)
    path = local(uri)
    if not path.is_file():
        raise ModelPressError(f"{field_path}: {uri} is not a file; give a .jsonl, .parquet or .txt file")
    if path.suffix not in FILE_TYPES:
        raise ModelPressError(f"{field_path}: {path.name} is not a {', '.join(FILE_TYPES)} file; convert it or use a hub dataset")
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path))
    return path


def _hub_dataset(name: str, subset: str | None, split: str, field_path: str, token: str | None) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, subset, split=split, token=token)
    except DatasetNotFoundError:
        raise ModelPressError(f"{field_path}: hub dataset {name!r} not found (or not reachable offline); check the name") from None
    except ValueError as err:
        raise ModelPressError(f"{field_path}: {name!r} split {split!r} / subset {subset!r}: {str(err).splitlines()[0]}") from None


def calibration_set(
    data: CalibrationData, tokenizer: Any, num_samples: int, max_len: int, seed: int, text_field: str, messages_field: str
) -> list[torch.Tensor]:
    """Exactly `num_samples` token samples, or a clear error saying how many the data holds."""
    samples = calibration_samples(data, tokenizer, num_samples, max_len, seed, text_field, messages_field)
    if len(samples) < num_samples:
        raise ModelPressError(
            f"spec.calibration.numSamples: the dataset yields {len(samples)} usable samples of at most "
            f"{max_len} tokens, fewer than the {num_samples} asked; lower numSamples (or maxSequenceLength for a "
            "text file) or give more data"
        )
    return samples


def evaluation_text(data: CalibrationData, text_field: str, max_chars: int) -> str:
    """The evaluation set as one text: a text file as it is, records' `text_field` joined by blank lines."""
    if isinstance(data, Path) and data.suffix == ".txt":
        return data.read_text(encoding="utf-8")[:max_chars]
    records = (json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()) if isinstance(data, Path) else data
    parts, size = [], 0
    for record in records:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ModelPressError(f"spec.evaluation.perplexity.textField: a record has no {text_field!r} text; set textField")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def self_generated(model: Any, tokenizer: Any, num_samples: int, max_len: int, seed: int,
                   on_progress: Callable[[Rate], None] | None = None) -> list[torch.Tensor]:
    """Samples the model writes itself (`sampling.generate`), starting from its BOS token alone.

    Every sample has the same length, min(maxSequenceLength, SELF_GENERATED_MAX_LENGTH), so the
    budget is fixed up front: num_samples x length tokens.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ModelPressError("spec.calibration.dataset: self-generated needs a tokenizer with a BOS or EOS token; give a dataset")
    return generate(model, start, num_samples, min(max_len, SELF_GENERATED_MAX_LENGTH), seed, on_progress)
