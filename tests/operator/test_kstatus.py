"""kstatus conditions: what Flux health checks, `kstatus` and cli-utils read from a CompressionJob.

`kstatus_of` restates kstatus' documented rules for a resource with its standard conditions
(cli-utils pkg/kstatus, checkGenericProperties; a custom resource with no rule of its own is Current
when none applies). Every state the operator writes is checked against them, and against what a
Flux Kustomization with `wait: true` or `healthChecks` does with that kstatus result.
"""

from typing import Any

import pytest

from modelpress.operator.conditions import UNOBSERVED, kstatus_conditions, observed
from modelpress.operator.crd import build_crd
from modelpress.operator.status import TERMINAL_PHASES, Observation, finished_patch, status_patch
from support.crd_schema import problems
from support.job_states import FAILURES, STATES, compression_job
from support.kube import CR, NAMESPACE, api, cr_path, create_cr, eventually, obj, operator_running

# kstatus result -> what Flux does with a health-checked object in that state.
FLUX = {"Current": "healthy", "InProgress": "keeps waiting", "Failed": "fails the health check", "Terminating": "keeps waiting"}


def kstatus_of(resource: dict[str, Any]) -> str:
    """kstatus' generic rules: deletion, then the observed generation, then Reconciling and Stalled."""
    if resource["metadata"].get("deletionTimestamp"):
        return "Terminating"
    status = resource.get("status") or {}
    generation = resource["metadata"].get("generation")
    if generation is not None and "observedGeneration" in status and status["observedGeneration"] != generation:
        return "InProgress"
    for cond in status.get("conditions") or []:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


@pytest.mark.parametrize("state, kstatus", [
    ("new", "InProgress"),
    ("waiting-for-reference", "InProgress"),
    ("pending", "InProgress"),
    ("pending-image-pull", "Failed"),  # blocked until a person fixes the image: Flux need not wait out its timeout
    ("queued", "InProgress"),
    ("suspended", "InProgress"),
    ("running", "InProgress"),
    ("succeeded", "Current"),
    ("succeeded-spec-changed", "InProgress"),
    *((f"failed-{reason}", "Failed") for reason in FAILURES),
])
def test_every_state_reads_as_kstatus_documents_it(state: str, kstatus: str, validator: Any) -> None:
    resource = STATES[state]()
    assert kstatus_of(resource) == kstatus, FLUX[kstatus]
    assert problems(validator, resource) == []


def test_a_job_the_operator_has_not_seen_is_in_progress_not_current() -> None:
    # Without the CRD's status default, kstatus would call a fresh object Current and Flux would pass it at once.
    assert build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["default"] == UNOBSERVED
    fresh = {"metadata": {"generation": 1}}
    assert kstatus_of(fresh) == "Current"
    assert kstatus_of({**fresh, "status": dict(UNOBSERVED)}) == "InProgress"


def test_deleting_job_is_terminating() -> None:
    resource = STATES["succeeded"]()
    resource["metadata"]["deletionTimestamp"] = "2026-01-01T11:00:00Z"
    assert kstatus_of(resource) == "Terminating"


@pytest.mark.parametrize("phase, blocked, released, ready, reconciling, stalled", [
    *((phase, False, False, "False", "True", "False") for phase in ("Pending", "Queued", "Suspended", "Running")),
    *((phase, True, False, "False", "False", "True") for phase in ("Pending", "Queued", "Suspended", "Running")),
    ("Succeeded", False, False, "True", "True", "False"),
    ("Succeeded", False, True, "True", "False", "False"),
    ("Failed", False, False, "False", "True", "False"),
    ("Failed", False, True, "False", "False", "True"),
])
def test_conditions_per_phase(phase: str, blocked: bool, released: bool, ready: str, reconciling: str, stalled: str) -> None:
    assert [(c.type, c.status) for c in kstatus_conditions(phase, blocked, released)] == [
        ("Ready", ready), ("Reconciling", reconciling), ("Stalled", stalled)]
    # abnormal-true: never both Reconciling and Stalled, so kstatus' verdict does not hang on their order
    assert [reconciling, stalled].count("True") <= 1


@pytest.mark.parametrize("reason", sorted(FAILURES))
def test_a_failure_stalls_with_its_reason_and_message(reason: str) -> None:
    status = FAILURES[reason]()["status"]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Stalled"]["status"] == "True" and by_type["Stalled"]["reason"] == reason == status["failure"]["reason"]
    assert by_type["Stalled"]["message"] == status["failure"]["message"] != ""
    assert by_type["Ready"]["status"] == "False" and by_type["Reconciling"]["status"] == "False"
    assert by_type["Succeeded"]["status"] == "False"


def test_every_condition_carries_the_observed_generation() -> None:
    resource = compression_job(Observation(phase="Running", reason="Running", message="the runner is working"), generation=3)
    assert resource["status"]["observedGeneration"] == 3
    assert {c["type"]: c["observedGeneration"] for c in resource["status"]["conditions"]} == {
        "Succeeded": 3, "Ready": 3, "Reconciling": 3, "Stalled": 3}


def test_transition_times_move_only_when_a_condition_flips() -> None:
    running = status_patch({}, 1, Observation(phase="Running", reason="Running"), None)
    for cond in running["conditions"]:
        cond["lastTransitionTime"] = "2026-01-01T10:00:00Z"
    done = status_patch(running, 1, Observation(phase="Succeeded", reason="Succeeded"), None)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Stalled"] == times["Reconciling"] == "2026-01-01T10:00:00Z"  # False and True before and after
    assert times["Ready"] != "2026-01-01T10:00:00Z"
    released = {c["type"]: c["lastTransitionTime"] for c in finished_patch(done, 1)["conditions"]}
    assert released["Stalled"] == "2026-01-01T10:00:00Z" and released["Reconciling"] != "2026-01-01T10:00:00Z"


def test_a_finished_job_sees_a_new_generation_without_changing_its_verdict() -> None:
    resource = STATES["succeeded-spec-changed"]()
    assert kstatus_of(resource) == "InProgress"
    resource["status"].update(observed(resource["status"], 2))
    assert kstatus_of(resource) == "Current"
    assert all(c["observedGeneration"] == 2 for c in resource["status"]["conditions"])
    assert observed(resource["status"], 2) == {}


@pytest.mark.asyncio
async def test_operator_marks_a_finished_jobs_spec_change_as_seen(kube: Any) -> None:
    spec = {"model": {"uri": "hf://acme/tiny"}, "recipe": {"preset": "W4A16", "algorithm": "RTN"},
            "output": {"uri": "s3://models", "connection": "models-s3"}}  # no prefix: refused, no Job needed
    async with operator_running():
        await create_cr(kube, "tiny", spec)
        await eventually(lambda: obj(kube, CR, "tiny")["status"]["phase"] == "Failed")
        assert kstatus_of(obj(kube, CR, "tiny")) == "Failed"
        await api(kube, "PATCH", cr_path("tiny"), {"spec": {"runtime": {"suspend": True}}})
        await eventually(lambda: obj(kube, CR, "tiny")["status"]["observedGeneration"] == 2)
    resource = obj(kube, CR, "tiny", NAMESPACE)
    assert resource["metadata"]["generation"] == 2 and resource["status"]["phase"] in TERMINAL_PHASES
    assert kstatus_of(resource) == "Failed"
