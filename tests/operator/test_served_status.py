"""status.result shows what vLLM made of the output (spec.evaluation.servable), within the status' bounds."""

from modelpress.contract import ResultEvent
from modelpress.operator.status import Result, parse_result


def result_message(served: dict, served_nll: dict | None = None) -> str:
    return ResultEvent.model_validate({"output": {"uri": "s3://b/m"}, "served": served,
                                       "metrics": {"perplexityCompressed": 29.4, **({"servedNll": served_nll} if served_nll else {})},
                                       }).to_json()


def test_status_shows_the_served_fields_and_the_nll_as_metrics() -> None:
    status = parse_result(result_message(
        {"servedBy": "vllm 0.32.0", "loaded": True, "tokens": 630, "quantization": "compressed-tensors",
         "kernels": ["CPUWNA16LinearKernel"], "answers": [{"prompt": "Capital of France?", "answer": "Paris."}]},
        {"vllm": 3.37524, "transformers": 3.38028, "relativeDifference": -0.001489, "bound": 0.003, "passed": True}))
    served = status.served
    assert (served.served_by, served.loaded, served.tokens, served.kernels) == ("vllm 0.32.0", True, 630, ["CPUWNA16LinearKernel"])
    assert [(a.prompt, a.answer) for a in served.answers] == [("Capital of France?", "Paris.")]
    assert {m.name: m.value for m in status.metrics} == {
        "perplexityCompressed": 29.4, "servedNll.vllm": 3.37524, "servedNll.transformers": 3.38028,
        "servedNll.relativeDifference": -0.001489, "servedNll.bound": 0.003}
    assert parse_result(result_message({"servedBy": "vllm 0.32.0", "loaded": True})).served.answers == []


def test_status_keeps_a_long_served_block_within_its_bounds() -> None:
    status = parse_result(result_message({"servedBy": "vllm " + "9" * 500, "loaded": False, "reason": "x" * 5000,
                                          "kernels": [f"K{i}" * 100 for i in range(20)],
                                          "answers": [{"prompt": "p" * 3000, "answer": "a" * 3000}] * 40}))
    served = status.served
    assert len(served.served_by) == 128 and len(served.reason) == 1024
    assert len(served.kernels) == 8 and all(len(k) <= 128 for k in served.kernels)
    assert len(served.answers) == 32 and all(len(a.prompt) == len(a.answer) == 1024 for a in served.answers)
    Result.model_validate(status.model_dump(by_alias=True))  # what is written validates against the status schema
