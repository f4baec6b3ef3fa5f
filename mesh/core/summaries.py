"""DC summaries: what a DC tells its neighbours, and what this agent knows of theirs.

A few agents per DC (the first ``SPEAKERS`` member ids, so all agents agree who without
talking) swap summaries with the DCs the topology names, every ``INTERVAL_S``, over
``PeerService.Summary``. What they hear is stored in their own DC's etcd under the
speaker's lease, and every agent mirrors it: the router skips DCs whose summary says they
are full, and hands tasks to the live agents a summary lists before the topology's seeds.
A summary older than ``STALE_S`` says nothing, and the seeds are used. Pure but for the
etcd codec.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Mapping

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from mesh.core import planner
from mesh.core.ring import key_point
from mesh.core.router import Router
from mesh.core.tenants import NAME
from mesh.errors import InvalidTask
from mesh.v1 import peer_pb2

SPEAKERS = 2
INTERVAL_S = 1.0  # how often speakers swap summaries (calls, not etcd writes)
REFRESH_S = 30.0  # an unchanged summary is stored again this often, no more
STALE_S = 3 * REFRESH_S  # older than this, a summary says nothing
LIVE_ADDRESSES = 3
SAMPLE = 64  # members a summary's least loaded are picked from
MAX_MODELS = 256
MAX_GROUPS = 1024
MAX_HELD = 1_000_000
MAX_DEMAND = 1e9  # GPU-seconds a second asked of one model: far past any fleet


def build(
    dc: str,
    router: Router,
    address: Callable[[str], str | None],
    now_ms: int,
    global_held: Mapping[str, int] | None = None,
    demand: Mapping[str, float] | None = None,
) -> peer_pb2.DcSummary:
    """This DC as ``router`` sees it; ``address`` gives an agent's gRPC address;
    ``global_held`` the GPUs each group holds against its global cap; ``demand`` the work
    asked of the DC per model (the placement planner's view), of which the most asked
    ``MAX_MODELS`` go, at two significant digits. The sums are the
    router's running totals and the live agents the least loaded of a sample, so a
    speaker of a 10,000-agent DC builds one every second in microseconds."""
    totals = router.totals()
    sample = router.sample(key_point(f"{dc}@{now_ms}"), SAMPLE)
    members = router.members
    ranked = sorted(
        (router.tasks_of(a) / members[a].weight, a) for a in sample if not members[a].draining
    )
    live = [found for _, a in ranked if (found := address(a))]
    return peer_pb2.DcSummary(
        dc=dc,
        ts_unix_ms=now_ms,
        agents=totals.agents,
        slots=totals.slots,
        tasks=totals.tasks,
        capacity=totals.capacity,
        models_loaded=router.models_loaded()[:MAX_MODELS],
        live=live[:LIVE_ADDRESSES],
        global_held=dict(sorted((global_held or {}).items())[:MAX_GROUPS]),
        demand=planner.most_asked(demand or {}, MAX_MODELS),
    )


ADDRESS = re.compile(r"[A-Za-z0-9.:\[\]-]{1,255}")
MODEL = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
DC_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
GROUP = re.compile(NAME)
MAX_FUTURE_MS = 30_000


def check(summary: peer_pb2.DcSummary, now_ms: int) -> None:
    """Refuse a summary whose fields are out of bounds: it is stored, mirrored by every
    agent of this DC, and its addresses are dialled."""
    if not DC_NAME.fullmatch(summary.dc):
        raise InvalidTask("summary: dc is no DC name")
    if summary.ts_unix_ms > now_ms + MAX_FUTURE_MS:
        raise InvalidTask("summary: from the future (it would never go stale)")
    if len(summary.live) > LIVE_ADDRESSES or not all(map(ADDRESS.fullmatch, summary.live)):
        raise InvalidTask(f"summary: at most {LIVE_ADDRESSES} host:port addresses")
    if len(summary.models_loaded) > MAX_MODELS or not all(
        map(MODEL.fullmatch, summary.models_loaded)
    ):
        raise InvalidTask(f"summary: at most {MAX_MODELS} model names")
    if len(summary.global_held) > MAX_GROUPS or not all(
        GROUP.fullmatch(g) and n <= MAX_HELD for g, n in summary.global_held.items()
    ):
        raise InvalidTask(f"summary: at most {MAX_GROUPS} group names, each at most {MAX_HELD}")
    if len(summary.demand) > MAX_MODELS or not all(
        MODEL.fullmatch(m) and 0 <= v <= MAX_DEMAND for m, v in summary.demand.items()
    ):  # a NaN fails both comparisons
        raise InvalidTask(
            f"summary: demand for at most {MAX_MODELS} model names, each from 0 to {MAX_DEMAND:g}"
        )


def worth_storing(
    heard: peer_pb2.DcSummary, stored: peer_pb2.DcSummary | None, refresh_s: float = REFRESH_S
) -> bool:
    """Whether a summary just heard must be written to etcd: it says something the stored
    one does not, or the stored one is ``refresh_s`` old (so it never goes stale while
    its DC is there). Speakers swap summaries every second; etcd hears of a change, and
    of demand only when its shares drift (``planner.drifted``: it moves a little every
    second)."""
    if stored is None or heard.ts_unix_ms - stored.ts_unix_ms >= refresh_s * 1000:
        return True
    return _content(heard) != _content(stored) or planner.drifted(stored.demand, heard.demand)


def _content(summary: peer_pb2.DcSummary) -> bytes:
    """The summary but for when it was built and the demand."""
    timeless = peer_pb2.DcSummary()
    timeless.CopyFrom(summary)
    timeless.ts_unix_ms = 0
    timeless.ClearField("demand")
    return timeless.SerializeToString(deterministic=True)


def speaks(me: str, members: Mapping[str, object]) -> bool:
    return me in heapq.nsmallest(SPEAKERS, members)


def encode(summary: peer_pb2.DcSummary) -> bytes:
    """A summary as etcd keeps it: protobuf (every agent decodes every DC's summary at
    each change of one, so JSON's cost was paid many times over)."""
    return summary.SerializeToString(deterministic=True)


def decode(raw: bytes) -> peer_pb2.DcSummary:
    """A stored summary; one an older agent wrote as JSON is read too. ``ValueError``
    if it is neither."""
    try:
        if raw[:1] == b"{":
            return json_format.Parse(raw, peer_pb2.DcSummary(), ignore_unknown_fields=True)
        return peer_pb2.DcSummary.FromString(raw)
    except (json_format.ParseError, DecodeError) as exc:
        raise ValueError(f"not a summary: {exc}") from None


Summaries = Mapping[str, peer_pb2.DcSummary]


def fresh(summaries: Summaries, now_ms: int) -> dict[str, peer_pb2.DcSummary]:
    return {dc: s for dc, s in summaries.items() if now_ms - s.ts_unix_ms <= STALE_S * 1000}


def full(summaries: Summaries) -> frozenset[str]:
    """DCs with no room: as many tasks as slots plus queue room, or no active agent."""
    return frozenset(dc for dc, s in summaries.items() if s.tasks >= s.capacity)
