"""Prometheus metrics of an agent, served over HTTP when ``metrics_listen`` is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SUBMITTED = Counter("gpumesh_tasks_submitted_total", "Tasks accepted by Submit on this agent")
REJECTED = Counter("gpumesh_submit_rejected_total", "Submit calls refused", ["code"])
FINISHED = Counter("gpumesh_tasks_finished_total", "Runs that ended on this agent", ["state"])
OFFERS = Counter("gpumesh_offers_total", "Offers received from peers", ["result"])
FORWARDS = Counter("gpumesh_forwards_total", "Offers sent to peers", ["result"])
MOVES = Counter(
    "gpumesh_queued_moves_total",
    "Queued tasks offered to an idle agent of the DC, by outcome (moved or kept here)",
    ["outcome"],
)
BACKLOGGED = Counter("gpumesh_tasks_backlogged_total", "Tasks put in the DC's backlog")
RUNNING = Gauge("gpumesh_tasks_running", "Tasks running on this agent")
QUEUED = Gauge("gpumesh_tasks_queued", "Tasks in this agent's local queue")
MEMBERS = Gauge("gpumesh_members", "Agents of this DC in this agent's view")
GPU_SLOTS = Gauge("gpumesh_gpu_slots", "GPU slots of this agent")
# 1, labelled with who this agent is: dashboards join on it to group by DC.
AGENT_INFO = Gauge("gpumesh_agent_info", "This agent's id and DC", ["agent", "dc"])
# Latencies, in seconds (Prometheus base units). Calls and hops span 0.5 ms to 10 s; waits and
# runs span 5 ms to an hour.
CALL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
TASK_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
SUBMIT_SECONDS = Histogram(
    "gpumesh_submit_duration_seconds", "Submit, received to answered", buckets=CALL_BUCKETS
)
ROUTE_SECONDS = Histogram(
    "gpumesh_route_decision_seconds",
    "One routing decision",
    buckets=(0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.001, 0.01),
)
OFFER_SECONDS = Histogram(
    "gpumesh_offer_duration_seconds",
    "An offer to a peer agent, sent to answered",
    buckets=CALL_BUCKETS,
)
ETCD_SECONDS = Histogram(
    "gpumesh_etcd_transaction_seconds",
    "A transaction (or a group-commit batch of them), sent to answered",
    buckets=CALL_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "gpumesh_queue_wait_seconds",
    "A task queued (here or in the backlog) to started",
    buckets=TASK_BUCKETS,
)
RUN_SECONDS = Histogram(
    "gpumesh_run_duration_seconds",
    "A run on this agent, started to ended",
    ["pipeline"],
    buckets=TASK_BUCKETS,
)
TASK_SECONDS = Histogram(
    "gpumesh_task_duration_seconds", "A task created to ended, end to end", buckets=TASK_BUCKETS
)
LOOP_LAG = Histogram(
    "gpumesh_event_loop_lag_seconds",
    "How late the event loop ran a timer: time nothing else on the agent could move",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)

BACKLOG_DEPTH = Gauge(
    "gpumesh_backlog_depth", "Tasks waiting in the DC's backlog (queue owner only)", ["queue"]
)
BACKLOG_OLDEST = Gauge(
    "gpumesh_backlog_oldest_age_seconds",
    "How long the oldest backlog entry has waited (queue owner only)",
    ["queue"],
)
BACKLOG_STALLS = Counter(
    "gpumesh_backlog_stalls_total",
    "Dispatch ticks where the oldest entry waited past the stall bound with slots free",
)
BACKLOG_ENDED = Counter(
    "gpumesh_backlog_ended_total", "Backlog entries ended without running, by reason", ["code"]
)
DUPLICATE_IDS = Counter(
    "gpumesh_duplicate_ids_total",
    "Tasks recorded here while their id's home DC was unreachable, that another DC held",
)
OWNER_TERMS = Counter("gpumesh_owner_terms_total", "Terms this agent began as queue owner")
DUTY_ERRORS = Counter(
    "gpumesh_duty_errors_total",
    "Background work that raised, or was cancelled though nobody stopped it",
    ["duty"],
)
DUTY_RESTARTS = Counter(
    "gpumesh_duty_restarts_total", "Kept duties started again after they ended early", ["duty"]
)
OWNER_RESIGNED = Counter(
    "gpumesh_owner_resigned_total",
    "Queue-owner terms given up because a duty of the term ended or stalled",
    ["why"],
)

# Per group (the tenant a task counts against), never per user: groups are few and
# configured, users are many.
NO_GROUP = "(none)"
GROUP_GPU_SECONDS = Counter(
    "gpumesh_group_gpu_seconds_total", "GPU-seconds of runs that ended on this agent", ["group"]
)
PREEMPTED = Counter(
    "gpumesh_tasks_preempted_total", "Batch runs given back to online work", ["group"]
)
QUOTA_WAITING = Gauge(
    "gpumesh_quota_waiting_tasks", "Tasks on this agent waiting for their quota", ["group"]
)

GOSSIP_RECEIVED = Counter("gpumesh_gossip_received_total", "Gossip datagrams accepted")
GOSSIP_DROPPED = Counter(
    "gpumesh_gossip_dropped_total", "Gossip datagrams dropped, by reason", ["reason"]
)
GOSSIP_SENT_BYTES = Counter("gpumesh_gossip_sent_bytes_total", "Gossip bytes sent")


def observe(histogram: Histogram, seconds: float, trace_id: str = "") -> None:
    """Observe ``seconds`` (never below 0), with the task's trace id as the exemplar
    (OpenMetrics: a heatmap cell links to a trace that landed in it)."""
    exemplar = {"trace_id": trace_id} if trace_id else None
    histogram.observe(max(0.0, seconds), exemplar)


def serve(listen: str) -> str:
    """Serve /metrics on ``listen``; the URL it answers at."""
    host, _, port = listen.rpartition(":")
    server, _ = start_http_server(int(port), addr=host or "127.0.0.1")
    return f"http://{host or '127.0.0.1'}:{server.server_port}/metrics"
