"""Prometheus metrics of the operator (kopf has none of its own)."""

from prometheus_client import Counter, Histogram, start_http_server

JOBS_CREATED = Counter("modelpress_runner_jobs_created_total", "Runner Jobs created for CompressionJobs")
PHASES = Counter("modelpress_compressionjob_phase_total", "CompressionJobs entering a phase", ["phase", "reason"])
DURATION = Histogram(
    "modelpress_compressionjob_duration_seconds", "Wall time from Job start to its end", ["phase"],
    buckets=(60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600, 48 * 3600),
)

_served: set[int] = set()


def serve(port: int) -> None:
    """Expose /metrics on `port` once per process (0 turns it off)."""
    if port and port not in _served:
        start_http_server(port)
        _served.add(port)
