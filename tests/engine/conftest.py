"""Engine tier: tiny random models built offline in seconds."""

from support.models import llama_dir, tiny_model, tokenizer_dir  # noqa: F401  (fixtures)
