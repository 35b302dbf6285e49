"""One Linear stack, two engines: ModelPress's GPTQ and llm-compressor's on the same weight and Hessian.

    python bench/llmc_layer.py dump out/scales/layer0.pt                        # project venv
    .venv-llmc/bin/python bench/llmc_layer.py llmc out/scales/layer0.pt    # llm-compressor's venv
    python bench/llmc_layer.py compare out/scales/layer0.pt --output bench/llmc_layer.json

`dump` takes SmolLM2's layer-0 q/k/v (they share an input, so one stacked weight) and the Hessian
of their input over the calibration windows (the first layer's inputs are the float model's, so
both engines see the same one), and runs ModelPress's GPTQ on it for every scheme and order.
`llmc` runs compressed-tensors' `calculate_qparams` and llm-compressor's `quantize_weight` on the
same tensors. `compare` reports, per scheme, how many codes and scales differ and each result's
layer-wise error tr(dW H dW^T), the quantity GPTQ minimises.
"""

import argparse
import json
from pathlib import Path

import torch

CASES = [  # (name, symmetric, actorder) with group 64
    ("asym-static", False, "static"),
    ("sym-static", True, "static"),
    ("asym-none", False, None),
    ("sym-none", True, None),
]


def dump(path: Path, num_samples: int) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oneshot_bench import WIKITEXT, calibration_file

    from modelpress.engine.calibration import calibration_samples
    from modelpress.engine.gptq import gptq
    from modelpress.engine.quantize import dequantize, minmax_qparams
    from modelpress.engine.statistics import ActivationStats
    from modelpress.runner.smollm2 import smollm2_dir

    model_dir = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(calibration_file(WIKITEXT, path.parent), tokenizer, num_samples, 512)
    attn = model.model.layers[0].self_attn
    stats = ActivationStats()

    class Enough(Exception):
        pass

    def hook(_m: torch.nn.Module, args: tuple) -> None:
        stats.update(args[0].detach(), with_hessian=True, with_ranges=False)
        raise Enough

    handle = attn.q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for sample in samples:
            try:
                model(sample)
            except Enough:
                pass
    handle.remove()
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    h = stats.hessian
    ours = {}
    for name, symmetric, actorder in CASES:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64)
        result = gptq(w, h, args, actorder=actorder)
        ours[name] = {
            "q": result.q,
            "scale": result.qparams.scale,
            "zero_point": result.qparams.zero_point,
            "weight": dequantize(result.q, result.qparams, args),
        }
        observed = minmax_qparams(w, args, w.dtype)
        ours[name]["observed_scale"], ours[name]["observed_zero_point"] = observed.scale, observed.zero_point
    torch.save({"w": w, "h": h, "tokens": stats.tokens, "ours": ours}, path)


def llmc(path: Path) -> None:
    """llm-compressor 0.14's path: minmax observer -> calculate_qparams -> quantize_weight."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    data = torch.load(path)
    w, h = data["w"], data["h"]
    theirs = {}
    for name, symmetric, actorder in CASES:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64, actorder=actorder)
        g = w.reshape(w.shape[0], -1, 64)
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
        qw, loss, _ = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zp[None], None, args)
        theirs[name] = {"scale": scale, "zero_point": zp, "weight": qw[0]}
    data["llmc"] = theirs
    torch.save(data, path)


def compare(path: Path, output: Path | None) -> None:
    data = torch.load(path)
    w, h = data["w"].double(), data["h"].double()

    def layer_error(wq: torch.Tensor) -> float:
        d = wq.double() - w
        return float(torch.einsum("ij,jk,ik->", d, h, d) / 2)

    report = {"stack": "model.layers.0.self_attn.{q,k,v}_proj", "shape": list(w.shape), "tokens": data["tokens"], "cases": {}}
    for name, _, _ in CASES:
        ours, theirs = data["ours"][name], data["llmc"][name]
        zp_ours = ours["observed_zero_point"]
        report["cases"][name] = {
            "observed_scales_equal": bool(torch.equal(ours["observed_scale"], theirs["scale"].to(ours["observed_scale"].dtype))),
            "observed_zero_points_equal": zp_ours is None or bool(torch.equal(zp_ours.to(torch.int64), theirs["zero_point"].to(torch.int64))),
            "weights_differing": float((ours["weight"] != theirs["weight"]).float().mean()),
            "max_abs_difference": float((ours["weight"] - theirs["weight"]).abs().max()),
            "layer_error_modelpress": round(layer_error(ours["weight"]), 4),
            "layer_error_llmcompressor": round(layer_error(theirs["weight"]), 4),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["dump", "llmc", "compare"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.path, args.num_samples)
    elif args.command == "llmc":
        llmc(args.path)
    else:
        compare(args.path, args.output)


if __name__ == "__main__":
    main()
