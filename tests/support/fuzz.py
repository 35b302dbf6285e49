"""Property tests' shared settings and the count of examples each one tried (torch-free).

Every property runs a bounded, derandomized number of examples, so CI is repeatable; `counted`
tallies the examples a property actually ran, and the root conftest prints the tally at the end
of the tier.
"""

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

TRIED: Counter[str] = Counter()


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic and bounded: the same examples on every run, no example database, no deadline."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def counted(test: Callable[..., None]) -> Callable[..., None]:
    """Counts each example hypothesis runs through `test`."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        TRIED[test.__name__] += 1
        test(*args, **kwargs)

    return run


def strings_in(node: Any) -> list[str]:
    """Every string in a document, keys included: what an error message must not repeat when secret-shaped."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return []


def summary() -> str | None:
    """One line: examples tried in all, and by property."""
    if not TRIED:
        return None
    each = ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items()))
    return f"fuzz: {sum(TRIED.values())} examples tried ({each})"
