"""The kstatus conditions of a CompressionJob, so GitOps tools tell a running job from a finished one.

kstatus (Flux's health checks, `kstatus` and cli-utils) reads three things: `observedGeneration`,
and the two "abnormal-true" conditions, `Reconciling` (work is under way: InProgress) and
`Stalled` (it cannot go on without help: Failed); with neither True and the generation observed,
the object is Current. `Ready` is the positive condition people and Argo CD look for. A
CompressionJob runs to completion, so:

| phase                                  | Ready | Reconciling | Stalled |
|----------------------------------------|-------|-------------|---------|
| Pending, Queued, Suspended, Running    | False | True        | False   |
| Succeeded                              | True  | False       | False   |
| Failed                                 | False | False       | True    |

A suspended job counts as in progress: it has not produced its model, and a health check that
waits for it must keep waiting, not report it done. Every condition carries the phase's reason
and message, so `kubectl wait --for=condition=Stalled` says why.

kstatus calls an object without `status.observedGeneration` Current, so a job the operator has
not seen yet would pass a health check at once. The CRD therefore defaults `status` to
`UNOBSERVED` (generation -1, Flux's own convention): InProgress until the operator writes status.
A finished job whose spec still changes (`runtime.suspend` toggled in Git) has nothing left to
do, but the new generation must be seen, or it would read as InProgress forever (`observed`).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
UNOBSERVED = {"observedGeneration": -1}
ConditionStatus = Literal["True", "False"]

# phase -> (Ready, Reconciling, Stalled)
_RULES: dict[str, tuple[ConditionStatus, ConditionStatus, ConditionStatus]] = {
    "Pending": ("False", "True", "False"),
    "Queued": ("False", "True", "False"),
    "Suspended": ("False", "True", "False"),
    "Running": ("False", "True", "False"),
    "Succeeded": ("True", "False", "False"),
    "Failed": ("False", "False", "True"),
}


@dataclass(frozen=True)
class KstatusCondition:
    """One condition's type and status; the caller adds reason, message and times."""

    type: str
    status: ConditionStatus


def kstatus_conditions(phase: str) -> list[KstatusCondition]:
    """Ready, Reconciling and Stalled for a phase (an unknown phase counts as still in progress)."""
    ready, reconciling, stalled = _RULES.get(phase, _RULES["Pending"])
    return [KstatusCondition(READY, ready), KstatusCondition(RECONCILING, reconciling), KstatusCondition(STALLED, stalled)]


def observed(status: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """The status fields that mark `generation` as seen without other change; empty when it already is."""
    if status.get("observedGeneration") == generation:
        return {}
    conditions = [{**cond, "observedGeneration": generation} for cond in status.get("conditions") or []]
    return {"observedGeneration": generation, "conditions": conditions}
