"""What every test of the vllm tier shares: vLLM's own interpreter, and the marks that skip the
tier, saying why, where it is not installed."""

import os

import pytest

VLLM_PYTHON = os.environ.get("MODELPRESS_VLLM_PYTHON")
TIER = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="vLLM is not installed for the tests: `make test-vllm` builds its "
                       "venv (.venv-vllm) and runs this tier with MODELPRESS_VLLM_PYTHON set"),
]
