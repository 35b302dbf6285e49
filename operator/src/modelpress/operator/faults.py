"""Why a run cannot go on, read from what Kubernetes says: a refused create, a pod that cannot start,
a pod the Job controller cannot make. Pure functions over plain dicts, like `status`.

Each cause has a kind, which decides what the status does with it:

- waiting: the cluster may clear it by itself (a full quota, no node free yet): the run stays
  Pending, for as long as its activeDeadlineSeconds allows;
- stalled: only a person can clear it (a Secret deleted under the pod, an image that cannot be
  pulled, a pod the cluster refuses to create): Pending and Stalled, then Failed once it has lasted
  the operator's stall timeout;
- fatal: nothing will clear it (an image name that cannot parse, a Job the API server refused):
  Failed at once.
"""

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["waiting", "stalled", "fatal"]

# Container waiting reasons the kubelet keeps retrying, though only a change in the cluster helps.
STALLED_WAITING = frozenset({"CreateContainerConfigError", "CreateContainerError", "ErrImagePull", "ImagePullBackOff"})
# Container waiting reasons no retry can clear.
FATAL_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})
QUOTA_MARK = "exceeded quota"


@dataclass(frozen=True)
class Blocker:
    reason: str
    message: str
    kind: Kind


def refusal(status: int | None, message: str, what: str) -> Blocker | None:
    """The API server's refusal to create `what`; None for faults of the server itself (5xx, throttling),
    which are retried as they are."""
    if status is None or status >= 500 or status == 429:
        return None
    if status == 403 and QUOTA_MARK in message:
        return Blocker("QuotaExceeded", f"{what}: {message}; retried until the quota has room", "waiting")
    return Blocker("JobRejected", f"the API server refused {what}: {message}", "fatal")


def pod_blocker(pod: Mapping[str, Any]) -> Blocker | None:
    """Why a pod that has not finished cannot run: a container that cannot start, or no node for it."""
    status = pod.get("status") or {}
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        if reason in FATAL_WAITING or reason in STALLED_WAITING:
            message = f"container {container.get('name')}: {waiting.get('message') or reason}"
            return Blocker(reason, message, "fatal" if reason in FATAL_WAITING else "stalled")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return Blocker(cond.get("reason") or "Unschedulable", cond.get("message") or "no node fits the pod", "waiting")
    return None


def parse_time(text: str | None) -> datetime.datetime | None:
    """A Kubernetes timestamp (seconds or microseconds, `Z`) as an aware datetime."""
    return datetime.datetime.fromisoformat(text) if text else None


def _event_time(event: Mapping[str, Any]) -> datetime.datetime | None:
    return parse_time(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp"))


def creation_blocker(events: Iterable[Mapping[str, Any]], job: Mapping[str, Any],
                     since: datetime.datetime | None) -> Blocker | None:
    """The Job controller's latest FailedCreate for this very Job (by uid) after `since`: its pod was
    refused by a quota (waiting) or by admission, such as an SCC or a policy (stalled)."""
    uid = job.get("metadata", {}).get("uid")
    found = [(time, event) for event in events
             if (event.get("involvedObject") or {}).get("uid") == uid and event.get("reason") == "FailedCreate"
             and (time := _event_time(event)) is not None and (since is None or time >= since)]
    if not found:
        return None
    message = max(found, key=lambda item: item[0])[1].get("message") or "the Job controller cannot create the pod"
    if QUOTA_MARK in message:
        return Blocker("QuotaExceeded", message, "waiting")
    return Blocker("FailedCreate", message, "stalled")
