"""Prometheus metrics of one gateway, in a private registry (so several gateways can live in a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Creates from a warm pool take about a millisecond; forks on demand and spawns tens to hundreds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sandboxes_active = Gauge("forkd_sandboxes_active", "Sandboxes running (handed out)", registry=r)
        self.sessions_active = Gauge("forkd_sessions_active", "Client connections open", registry=r)
        self.pool_ready = Gauge(
            "forkd_pool_ready", "Children forked and waiting in the warm pool", ["template"], registry=r
        )
        self.spawn_seconds = Histogram(
            "forkd_spawn_seconds",
            "Time of one backend spawn call (a batch of children)",
            ["template"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.spawned = Counter("forkd_spawned", "Children spawned by the backend", ["template"], registry=r)
        self.create_seconds = Histogram(
            "forkd_create_seconds",
            "Time to answer sandbox.create",
            ["template"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sandboxes_created = Counter(
            "forkd_sandboxes_created", "Sandboxes created", ["template"], registry=r
        )
        self.sandboxes_ended = Counter(
            "forkd_sandboxes_ended", "Sandboxes ended, by reason", ["reason"], registry=r
        )
        self.execs = Counter("forkd_execs", "Commands started (exec.start relayed)", registry=r)
        self.branches = Counter(
            "forkd_branches", "sandbox.branch calls that captured their source", registry=r
        )
        self.branch_seconds = Histogram(
            "forkd_branch_seconds",
            "Time to answer sandbox.branch (capture, spawn and hand over every child)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.capture_pause_seconds = Histogram(
            "forkd_capture_pause_seconds",
            "How long a captured sandbox was stopped (branch and snapshot.create)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.snapshots_active = Gauge(
            "forkd_snapshots_active", "Snapshots kept (user snapshots and branch captures in use)", registry=r
        )
        self.errors = Counter(
            "forkd_errors", "Error responses sent to clients, by code", ["code"], registry=r
        )
        self.port_requests = Counter(
            "forkd_port_requests",
            "HTTP requests and websockets proxied to sandbox ports, by kind (http, websocket) and outcome",
            ["kind", "outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
