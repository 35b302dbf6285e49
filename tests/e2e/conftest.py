"""End to end: the operator's Job run as a local runner process against moto's S3."""

from support.kube import kube, validator  # noqa: F401  (fixtures)
from support.models import llama_dir, tiny_model, tokenizer_dir  # noqa: F401  (fixtures)
from support.s3 import s3_endpoint, trained_llama  # noqa: F401  (fixtures)
