"""Settings for every tier. Torch-free: the operator tier runs where torch is not installed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
