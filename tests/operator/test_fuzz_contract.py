"""Property tests of the contract: `parse_job` on mangled documents and `parse_uri` on hostile text.

Each property runs a fixed number of derandomized examples (support.fuzz); the tier's last lines
say how many were tried.
"""

import copy
import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from modelpress.contract import CompressionJob, InvalidSpec, connection_uses, parse_job, parse_uri, pvc_mount, secret_like
from support.fuzz import counted, fuzz_settings, strings_in
from support.hostile import SECRET_SHAPES

FULL: dict[str, Any] = {
    "apiVersion": "modelpress.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "fuzz", "namespace": "ml", "labels": {"team": "a"}},
    "spec": {
        "model": {"uri": "hf://acme/tiny", "revision": "main", "tokenSecret": {"name": "hf", "key": "HF_TOKEN"}},
        "recipe": {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64, "ignore": ["lm_head"]},
        "calibration": {"dataset": "s3://data/calib.jsonl", "connection": "data-s3", "numSamples": 8, "maxSequenceLength": 64},
        "evaluation": {"perplexity": {"dataset": "hf://wikitext", "maxTokens": 128}, "prompts": ["Paris is"],
                       "maxPerplexityIncrease": 10},
        "output": {"uri": "pvc://models/tiny-w4a16", "overwrite": True},
        "runtime": {"resources": {"gpus": 1, "memory": "16Gi"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {}}},
    },
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a document, parents before children."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


PATHS = _paths(FULL)
SCHEMA = CompressionJob.model_json_schema(by_alias=True)
FIELD_NAMES = sorted({n for d in [SCHEMA, *SCHEMA.get("$defs", {}).values()] for n in d.get("properties", {})})
PLAUSIBLE = ["hf://acme/tiny", "s3://bkt/k", "pvc://c/p", "pvc://c/../x", "s3://bkt/../k", "/tmp/x", "self-generated", "W4A16",
             "FP8", "GPTQ", "RTN", "16Gi", "lm_head", "", "ftp://x", "pvc://../x", "a" * 300]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
           | SECRET_SHAPES | st.sampled_from(PLAUSIBLE))
KEYS = st.sampled_from(FIELD_NAMES) | st.sampled_from(["\n", "a\nb", "\x00", "a b", "🙂", "x" * 400]) | st.text(max_size=8) | SECRET_SHAPES
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """FULL with a few of its values replaced, removed, or joined by unknown keys."""
    doc = copy.deepcopy(FULL)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, dict) and key in parent else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["set", "set", "delete", "add", "add"]))
        if action == "set":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            parent[draw(KEYS)] = draw(VALUES)
    return doc


@fuzz_settings(max_examples=1500)
@given(documents() | VALUES)
@counted
def test_parse_job_raises_only_invalid_spec_and_never_echoes_a_secret(document: Any) -> None:
    try:
        job = parse_job(document)
    except InvalidSpec as err:
        assert err.problems and all(": " in p and "\n" not in p for p in err.problems), err.problems
        said = "\n".join([str(err), *err.problems])
        leaked = [s for s in strings_in(document) if secret_like(s) and s in said]
        assert not leaked, (leaked, err.problems)
        return
    for use in connection_uses(job.spec):  # what the runner does first with a valid spec
        for _, uri in use.uris:
            parse_uri(uri)


SEGMENTS = st.sampled_from([".", "..", "", "a", "claim", "..x", "x..", "%2e%2e", "\x00", "\n", "~", "Claim"]) | st.text(max_size=4)


@st.composite
def locations(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["hf", "s3", "pvc", "gs", ""]))
    separator = draw(st.sampled_from(["://", ":/", "", "://"]))
    return scheme + separator + "/".join(draw(st.lists(SEGMENTS, max_size=6)))


@fuzz_settings(max_examples=1500)
@given(locations() | st.text(max_size=40))
@counted
def test_no_location_parse_uri_accepts_leaves_its_root(text: str) -> None:
    try:
        uri = parse_uri(text)
    except ValueError:
        return
    assert str(uri) == text
    if uri.scheme == "local":
        return
    assert ".." not in uri.root.split("/") and not any(ord(c) < 32 for c in text)
    if uri.scheme in ("s3", "pvc"):
        assert uri.root not in ("", ".") and "/" not in uri.root
        assert ".." not in uri.path.split("/") and not uri.path.startswith("/")
    if uri.scheme == "pvc":
        mount = pvc_mount(uri.root, "/mnt/pvc")
        assert os.path.dirname(mount) == "/mnt/pvc"
        resolved = os.path.normpath(os.path.join(mount, uri.path))
        assert resolved == mount or resolved.startswith(mount + "/"), (text, resolved)
