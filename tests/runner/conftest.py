"""Runner tier: tiny random models and moto's S3 server on 127.0.0.1."""

from support.models import llama_dir, tiny_model, tokenizer_dir  # noqa: F401  (fixtures)
from support.s3 import s3_endpoint, trained_llama  # noqa: F401  (fixtures)
