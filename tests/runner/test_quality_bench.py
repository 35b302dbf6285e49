"""bench/quality_bench.py, the W4A16 quality matrix: its cells, the shapes it refuses, and its table."""

import json
import sys
from pathlib import Path

from support.models import REPO

sys.path.insert(0, str(REPO / "bench"))
import quality_bench  # noqa: E402

from modelpress.engine.gptq import GPTQModifier  # noqa: E402
from modelpress.engine.recipe import load_recipe  # noqa: E402
from modelpress.engine.spinquant import SpinQuantModifier  # noqa: E402


def test_every_cell_is_a_recipe_the_engine_reads_and_priority_a_comes_first() -> None:
    names = [c.name for c in quality_bench.CELLS]
    assert len(names) == len(set(names)) == 41
    for cell in quality_bench.CELLS:
        file = quality_bench.RECIPES / f"{cell.stem}.yaml"
        modifiers = load_recipe(file)
        assert isinstance(modifiers[-1], GPTQModifier) == ("gptq" in cell.method)
        assert isinstance(modifiers[0], SpinQuantModifier) == cell.method.startswith("spinquant")
        weights = modifiers[-1].config_groups["group_0"]["weights"]
        observer, _, variant = cell.observer.partition("+")
        assert weights["symmetric"] == cell.symmetric and weights.get("observer", "minmax") == observer
        assert weights.get("observer_kwargs", {}).get("separate_ends", False) == (variant == "ends")
        assert getattr(modifiers[-1], "float_target", 0.0) == (0.5 if variant == "float" else 0.0)
        assert (cell.recipe().for_peer("llmcompressor") is None) == bool(variant)
        gptqmodel = cell.method == "gptq" and observer == "minmax" and variant in ("", "float")
        assert (cell.recipe().for_peer("gptqmodel") is not None) == gptqmodel
        assert quality_bench.group_size(file) == {"g64": 64, "g128": 128, "ch": None}[cell.grouping]
    first = quality_bench.CELLS[: len(quality_bench.FIRST)]
    assert [c.priority for c in first] == ["a"] * len(quality_bench.FIRST)
    assert first[0].name == "spinquant-hadamard-gptq-w4a16-asym-g64-imatrix"
    assert all(c.priority in "bc" for c in quality_bench.CELLS[len(first):])


def test_a_group_that_does_not_tile_an_input_width_is_not_run(tmp_path: Path) -> None:
    g128 = next(c for c in quality_bench.CELLS if c.name == "gptq-w4a16-asym-g128")
    g64 = next(c for c in quality_bench.CELLS if c.name == "gptq-w4a16-asym-g64")
    config = {"hidden_size": 576, "num_attention_heads": 9, "head_dim": 64, "intermediate_size": 1536}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert quality_bench.shape_refusal(g128, tmp_path) == "group 128 does not divide hidden_size 576, num_attention_heads x head_dim 576"
    assert quality_bench.shape_refusal(g64, tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 512, "num_attention_heads": 8}))
    assert quality_bench.shape_refusal(g128, tmp_path) is None


def _side(perplexity: float | None, wall: float | None) -> dict:
    return {"wall_s": wall, "perplexity": perplexity, "runs": [{"error": None if wall else "exit 1: no kernel"}]}


def test_table_gives_multiples_of_float_and_the_best_g64_per_side() -> None:
    report = {
        "machine": "m",
        "settings": {"num_samples": 32, "max_seq_length": 512, "calibration_span": "0:0.5", "evaluation_span": "0.5:1",
                     "perplexity_tokens": 8192, "text": "valid.txt"},
        "peers": {"llmcompressor": "python"},
        "models": {"smollm2": {"float_perplexity": 20.0}},
        "cases": [
            {"model": "smollm2", "recipe": "gptq-w4a16-asym-g64", "label": "GPTQ asym g64",
             "sides": {"modelpress": _side(22.0, 80), "llmcompressor": _side(22.4, 300)},
             "ratios": {"llmcompressor": {"perplexity": 0.982}}},
            {"model": "smollm2", "recipe": "rtn-w4a16-asym-ch", "label": "RTN asym channel",
             "sides": {"modelpress": _side(21.0, 10), "llmcompressor": _side(None, None)}, "ratios": {"llmcompressor": {}}},
            {"model": "smollm2", "recipe": "rtn-w4a16-asym-g64", "label": "RTN asym g64",
             "sides": {"modelpress": _side(24.0, 10), "llmcompressor": _side(21.6, 20)},
             "ratios": {"llmcompressor": {"perplexity": 1.111}}},
        ],
        "skipped": [{"model": "smollm2", "label": "GPTQ asym g128", "reason": "group 128 does not divide hidden_size 576"}],
    }
    table = quality_bench.markdown(report)
    assert "**32 × 512 tokens**" in table
    assert "| smollm2 | GPTQ asym g64 | 22.00, **1.100×**, 80 s | 22.40, **1.120×**, 300 s | 0.982× |" in table
    assert "failed: exit 1: no kernel" in table and "not run: group 128 does not divide hidden_size 576" in table
    assert "Best W4A16 g64, ModelPress: **1.100×** (GPTQ asym g64)." in table  # the channel cell is lower but not g64
    assert "Best W4A16 g64, llm-compressor 0.14: **1.080×** (RTN asym g64)." in table


def test_table_with_draws_gives_the_mean_and_each_draw() -> None:
    side = {**_side(22.0, 80), "perplexities": [21.0, 22.5, 22.5]}
    report = {
        "machine": "m",
        "settings": {"num_samples": 32, "max_seq_length": 512, "calibration_span": "0:0.5", "evaluation_span": "0.5:1",
                     "perplexity_tokens": 8192, "text": "valid.txt", "draws": 3},
        "peers": {},
        "models": {"smollm2": {"float_perplexity": 20.0}},
        "cases": [{"model": "smollm2", "recipe": "gptq-w4a16-asym-g64", "label": "GPTQ asym g64",
                   "sides": {"modelpress": side}, "ratios": {}}],
    }
    table = quality_bench.markdown(report)
    assert "perplexity the mean over 3 disjoint draws of calibration windows" in table
    assert "| smollm2 | GPTQ asym g64 | 22.00 (21.00 / 22.50 / 22.50), **1.100×**, 80 s |" in table
