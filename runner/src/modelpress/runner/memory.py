"""How much memory the job may use (the pod's cgroup limit, else the machine's), and how much it uses now."""

from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
MEMINFO = Path("/proc/meminfo")
STATUS = Path("/proc/self/status")
NO_LIMIT = 1 << 60  # cgroup v1 writes a number near 2^63 for "no limit"


def memory_limit(cgroup_v2: Path = CGROUP_V2, cgroup_v1: Path = CGROUP_V1, meminfo: Path = MEMINFO) -> int | None:
    """Bytes: the container's limit when it has one, else physical memory; None when nothing says."""
    for path in (cgroup_v2, cgroup_v1):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < NO_LIMIT:
            return int(text)
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes(status: Path = STATUS) -> int:
    """This process's resident memory now (VmRSS), else its peak so far."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
