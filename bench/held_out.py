"""The inputs every side of a comparison shares: calibration windows written to a file, perplexity on held-out text.

    python bench/held_out.py windows --model DIR --text valid.txt --span 0:0.5 \
        --num-samples 128 --max-seq-length 512 --out windows.json
    python bench/held_out.py perplexity --model OUTPUT_DIR --tokenizer DIR --text valid.txt --span 0.5:1

A span is a range of the text's characters as fractions (`0:0.5`, the first half). Calibration
and evaluation take disjoint spans, so perplexity is measured on text calibration never saw. The
windows are those the runner would cut from the span as a `.txt` dataset. Perplexity is the
runner's own (`modelpress.runner.evaluation.perplexity`), the same code for every checkpoint
whoever wrote it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SEED = 42


def parse_span(span: str) -> tuple[float, float]:
    """`start:end` in fractions of the text; refused unless 0 <= start < end <= 1."""
    try:
        start, end = (float(x) for x in span.split(":"))
    except ValueError:
        raise SystemExit(f"--span: {span!r} is not START:END (fractions, e.g. 0:0.5)") from None
    if not 0 <= start < end <= 1:
        raise SystemExit(f"--span: {span!r} needs 0 <= START < END <= 1")
    return start, end


def span_text(path: Path, span: str) -> str:
    text = path.read_text(encoding="utf-8")
    start, end = parse_span(span)
    return text[int(len(text) * start) : int(len(text) * end)]


def load_for_evaluation(path: Path) -> Any:
    """A checkpoint as transformers loads it for evaluation, float32.

    A checkpoint that quantizes activations goes through the compressed loader, which quantizes
    them as vLLM does; dequantizing would measure its weights only. A checkpoint with no
    quantization (pruned only) is a plain dense one.
    """
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((path / "config.json").read_text()).get("quantization_config")
    groups = (config or {}).get("config_groups") or {}
    if not groups or any(g.get("input_activations") for g in groups.values()):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))


def write_windows(model: Path, text: Path, span: str, num_samples: int, max_seq_length: int, out: Path) -> dict:
    """The calibration windows of `span`, as the runner cuts a `.txt` dataset, written as JSON."""
    from modelpress.engine.calibration import calibration_samples
    from modelpress.engine.weights import load_tokenizer

    tokenizer = load_tokenizer(model, False)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "calibration.txt"
        part.write_text(span_text(text, span), encoding="utf-8")
        samples = calibration_samples(part, tokenizer, num_samples, max_seq_length, SEED)
    if len(samples) < num_samples:
        raise SystemExit(f"--num-samples: the span {span} of {text} holds {len(samples)} windows of {max_seq_length} tokens; ask for fewer")
    record = {"text": str(text), "span": span, "num_samples": num_samples, "max_seq_length": max_seq_length, "seed": SEED,
              "input_ids": [s[0].tolist() for s in samples]}
    out.write_text(json.dumps(record) + "\n")
    return {k: v for k, v in record.items() if k != "input_ids"}


def measure_perplexity(model: Path, tokenizer_dir: Path, text: Path, span: str, max_tokens: int, seq_len: int) -> dict:
    from transformers import AutoTokenizer

    from modelpress.runner.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    body = span_text(text, span)
    tokens = len(tokenizer(body)["input_ids"])
    limit = max_tokens or tokens
    value = perplexity(load_for_evaluation(model), tokenizer, body, max_tokens=limit, seq_len=seq_len)
    return {"perplexity": round(value, 4), "tokens": min(tokens, limit), "span": span, "seq_len": seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("windows", help="write the calibration windows of a span as JSON")
    w.add_argument("--model", type=Path, required=True, help="the model directory whose tokenizer cuts the windows")
    w.add_argument("--text", type=Path, required=True)
    w.add_argument("--span", default="0:0.5")
    w.add_argument("--num-samples", type=int, required=True)
    w.add_argument("--max-seq-length", type=int, required=True)
    w.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("perplexity", help="perplexity of a checkpoint on a span, as JSON on stdout")
    p.add_argument("--model", type=Path, required=True, help="a float or compressed-tensors checkpoint")
    p.add_argument("--tokenizer", type=Path, required=True, help="the source model directory")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--span", default="0.5:1")
    p.add_argument("--max-tokens", type=int, default=8192, help="0: the whole span")
    p.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    if args.command == "windows":
        result = write_windows(args.model, args.text, args.span, args.num_samples, args.max_seq_length, args.out)
    else:
        result = measure_perplexity(args.model, args.tokenizer, args.text, args.span, args.max_tokens, args.seq_len)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
