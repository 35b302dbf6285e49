"""The kstatus conditions of a CompressionJob, so GitOps tools tell a running job from a finished one.

kstatus (Flux's health checks, `kstatus` and cli-utils) reads three things: `observedGeneration`,
and the two "abnormal-true" conditions, `Reconciling` (work is under way: InProgress) and
`Stalled` (it cannot go on without help: Failed); with neither True and the generation observed,
the object is Current. `Ready` is the positive condition people and Argo CD look for. The two
abnormal-true conditions are never True together (Flux's convention; kstatus reads whichever comes
first). A CompressionJob runs to completion, and the operator still has work after the outcome
(releasing the runner pods, deleting the scratch claim), so:

| phase                                  | operator            | Ready | Reconciling | Stalled |
|----------------------------------------|---------------------|-------|-------------|---------|
| Pending, Queued, Suspended, Running    | going on            | False | True        | False   |
| Pending, Queued, Suspended, Running    | blocked on a person | False | False       | True    |
| Succeeded                              | releasing           | True  | True        | False   |
| Succeeded                              | released            | True  | False       | False   |
| Failed                                 | releasing           | False | True        | False   |
| Failed                                 | released            | False | False       | True    |

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

TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class KstatusCondition:
    """One condition's type and status; the caller adds reason, message and times."""

    type: str
    status: ConditionStatus


def _flag(value: bool) -> ConditionStatus:
    return "True" if value else "False"


def kstatus_conditions(phase: str, blocked: bool = False, released: bool = False) -> list[KstatusCondition]:
    """Ready, Reconciling and Stalled for a phase (an unknown phase counts as still in progress).

    `blocked`: the run cannot go on until a person acts; `released`: the operator holds nothing of a
    finished run any more."""
    terminal = phase in TERMINAL_PHASES
    stalled = (blocked and not terminal) or (phase == "Failed" and released)
    reconciling = not stalled and not (terminal and released)
    return [KstatusCondition(READY, _flag(phase == "Succeeded")), KstatusCondition(RECONCILING, _flag(reconciling)),
            KstatusCondition(STALLED, _flag(stalled))]


def observed(status: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """The status fields that mark `generation` as seen without other change; empty when it already is."""
    if status.get("observedGeneration") == generation:
        return {}
    conditions = [{**cond, "observedGeneration": generation} for cond in status.get("conditions") or []]
    return {"observedGeneration": generation, "conditions": conditions}
