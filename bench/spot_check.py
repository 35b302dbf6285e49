"""A compressed checkpoint's Linears against round-to-nearest of the source weights, a few at a time.

    python bench/spot_check.py SOURCE_DIR OUTPUT_DIR GROUP_SIZE

Prints one JSON object: per checked Linear, the relative error ||W - Q||_F / ||W||_F of the
output's dequantized weight Q (read back with the checkpoint reader) and of RTN of the source
weight (minmax, symmetric int4, the same group size), and the fraction of weights where Q equals
that RTN exactly. RTN outputs should equal it; GPTQ moves weights to compensate rounding, so its
weight error is larger than RTN's, but bounded. Also whether the tensors outside the decoder
layers (embeddings, norms, head) were copied unchanged.
"""

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs

from modelpress.engine.checkpoint_reader import DequantizingSource
from modelpress.engine.quantize import dequantize, minmax_qparams, quantize
from modelpress.engine.weights import SafetensorsSource

MODULES = ("self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj", "self_attn.v_proj")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    source_dir, output_dir, group = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    config = json.loads((source_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    source = SafetensorsSource(source_dir)
    output = DequantizingSource(output_dir, dtype=getattr(torch, config["dtype"]))
    checked = []
    for layer, module in zip((0, layers // 2, layers - 1, layers // 3), MODULES):
        name = f"model.layers.{layer}.{module}"
        w = source.get(f"{name}.weight")
        q = output.get(f"{name}.weight")
        rtn = dequantize(quantize(w, qp := minmax_qparams(w, args, w.dtype), args), qp, args)
        checked.append({"module": name, "quantized": name in output.quantized, "error": round(relative(q, w), 5),
                        "rtn_error": round(relative(rtn, w), 5), "equal_to_rtn": round(float((q == rtn).float().mean()), 5)})
        del w, q, rtn
    outside = [n for n in source.names() if not n.startswith("model.layers.")] + [f"model.layers.{layers - 1}.input_layernorm.weight"]
    copied = all(torch.equal(source.get(n), output.get(n)) for n in outside)
    print(json.dumps({"linears": checked, "outside_copied": copied}))


if __name__ == "__main__":
    main()
