"""Probe: GPTQ that aims each layer at the float model's output, not at its own quantized input's.

    python bench/float_target_probe.py --model DIR --windows windows.json [--num-samples 32] [--alpha 0.5]

Plain GPTQ minimizes ||(Q - W) X_q|| on the inputs X_q the already-quantized layers before it
produce, so the error those layers left is never paid back. Aiming at the float output instead,
min ||Q X_q - W X_f||, has the same Hessian H = X_q X_q^T and a shifted target:

    W* = W + alpha * W C H^-1,   C = (X_f - X_q) X_q^T

(the residual of the least-squares fit is constant in Q, so GPTQ on W* with H solves it; alpha = 1
is the exact shift, smaller values damp it). The float and the quantized model run side by side,
layer by layer, whole in memory: a measurement of the idea on a small model, not the engine's
bounded-memory path. Each layer's Linears are quantized together from one pass (not true-sequential
within the layer), with `--alpha 0` as the baseline built the same way. W4A16 asymmetric g64,
`imatrix_mse`, static act order; prints one JSON line with the held-out perplexity.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelpress.engine.gptq import gptq
from modelpress.engine.pipeline import capture_first_layer_inputs
from modelpress.engine.quantize import dequantize, imatrix_mse_qparams
from modelpress.runner.evaluation import perplexity

BATCH = 8


def float_target(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, alpha: float, damp: float = 0.01) -> torch.Tensor:
    """W + alpha W C H^-1, H damped as GPTQ damps it (a fraction of its mean diagonal)."""
    damped = hessian + damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    return w + alpha * torch.cholesky_solve(cross.T @ w.T, torch.linalg.cholesky(damped)).T


def run(model_dir: Path, windows: torch.Tensor, alpha: float, args: QuantizationArgs) -> Any:
    float_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quant_model = copy.deepcopy(float_model)
    # layer 0's inputs, batch by batch: the hidden states, and the masks and rotary tables beside them
    batches = [windows[i : i + BATCH] for i in range(0, len(windows), BATCH)]
    captured = capture_first_layer_inputs(float_model, float_model.model.layers[0], batches, torch.device("cpu"))
    kw = {k: v for k, v in captured[0][1].items() if k != "hidden_states"}

    def forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
        y = layer(x, **kw)
        return y[0] if isinstance(y, tuple) else y

    with torch.no_grad():
        xf = [args[0] if args else kwargs["hidden_states"] for args, kwargs in captured]
        xq = [x.clone() for x in xf]
        for fl, ql in zip(float_model.model.layers, quant_model.model.layers):
            linears = {n: m for n, m in ql.named_modules() if isinstance(m, torch.nn.Linear)}
            floats = {n: m for n, m in fl.named_modules() if n in linears}
            seen_f: dict[str, torch.Tensor] = {}
            seen_q: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen_f.__setitem__(n, a[0])) for n, m in floats.items()]
            hooks += [m.register_forward_pre_hook(lambda m, a, n=n: seen_q.__setitem__(n, a[0])) for n, m in linears.items()]
            hessian: dict[str, torch.Tensor] = {}
            cross: dict[str, torch.Tensor] = {}
            tokens = 0
            next_xf = []  # the float layer stays as it is: its outputs here are the next layer's inputs
            for f, q in zip(xf, xq):
                next_xf.append(forward(fl, f))
                forward(ql, q)
                tokens += q.shape[0] * q.shape[1]
                for n in linears:
                    a = seen_q[n].reshape(-1, seen_q[n].shape[-1])
                    hessian[n] = hessian.get(n, 0) + a.T @ a
                    if alpha:
                        cross[n] = cross.get(n, 0) + (seen_f[n].reshape(a.shape) - a).T @ a
            for h in hooks:
                h.remove()
            for n, linear in linears.items():
                w, h = linear.weight.float(), hessian[n]
                if alpha:
                    w = float_target(w, h, cross[n], alpha)
                result = gptq(w, h.clone(), args, observer=imatrix_mse_qparams, importance=h.diagonal() / tokens)
                linear.weight.data = dequantize(result.q, result.qparams, args).float()
            xf = next_xf
            xq = [forward(ql, x) for x in xq]
    return quant_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a float model directory (rotated or not)")
    parser.add_argument("--windows", type=Path, required=True, help="bench/held_out.py windows output")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5, help="0: plain GPTQ, built the same way")
    parser.add_argument("--text", type=Path, required=True, help="perplexity on its second half")
    args = parser.parse_args()
    windows = torch.tensor(json.loads(args.windows.read_text())["input_ids"][: args.num_samples])
    scheme = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    start = time.monotonic()
    model = run(args.model, windows, args.alpha, scheme)
    seconds = time.monotonic() - start
    text = args.text.read_text(encoding="utf-8")
    ppl = perplexity(model, AutoTokenizer.from_pretrained(args.model), text[len(text) // 2 :], max_tokens=8192, seq_len=512)
    json.dump({"model": str(args.model), "num_samples": len(windows), "alpha": args.alpha, "perplexity": round(ppl, 4),
               "seconds": round(seconds, 1)}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
