"""CI's check of `make demo`: print its summary as a person sees it, and fail unless the compressed model still answers.

    make demo > out/demo.jsonl; python tests/check_demo.py out/demo.jsonl

Reads the runner's JSON lines (what `make demo` prints off a terminal). The demo's own quality
gate (`maxPerplexityIncrease` in examples/quickstart.yaml) already failed the run if perplexity
rose too far; this adds what a reader of the answers would check first.
"""

import sys
from pathlib import Path

from modelpress.contract import FailureEvent, ResultEvent, parse_event
from modelpress.runner.progress import summary

EXPECTED = {"What is the capital of France?": "Paris"}  # prompt -> what the compressed answer must name


def problems(result: ResultEvent) -> list[str]:
    """What is wrong with the demo's answers: a prompt left unanswered, or an expected word missing."""
    answers = {a.prompt: a.compressed for a in result.answers or []}
    found = [f"no answer to {prompt!r}" for prompt, text in answers.items() if not text.strip()]
    found += [f"the compressed model's answer to {prompt!r} does not name {word}: {answers.get(prompt)!r}"
              for prompt, word in EXPECTED.items() if word not in (answers.get(prompt) or "")]
    return found


def main(path: str) -> int:
    events = [parse_event(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    last = next((e for e in reversed(events) if isinstance(e, (ResultEvent, FailureEvent))), None)
    if last is None:
        print("check_demo: the demo wrote no result line", file=sys.stderr)
        return 1
    if isinstance(last, FailureEvent):
        print(f"check_demo: the demo failed: {last.message}", file=sys.stderr)
        return 1
    print(summary(last))
    for problem in problems(last):
        print(f"check_demo: {problem}", file=sys.stderr)
    return 1 if problems(last) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
