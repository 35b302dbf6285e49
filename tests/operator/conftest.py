"""Operator tier: kopf in-process against kmock, no torch (the operator image has none)."""

from support.kube import kube, validator  # noqa: F401  (fixtures)
