"""Fuzzing a live agent, at CI size: hypothesis over every field of Submit, Offer and
RunStage, raw and bent gossip datagrams, and HTTP requests to the gateway. ``python -m
bench fuzz`` runs thousands of each."""

from __future__ import annotations

import json

import aetcd
from support import Cluster

from bench.fuzz import (
    Tally,
    fuzz_gossip,
    fuzz_http,
    fuzz_offer,
    fuzz_stage,
    fuzz_submit,
    still_well,
)
from mesh.channels import Security
from mesh.gossip.wire import Keyring
from mesh.local.localmesh import free_port
from mesh.store.keys import KeySpace

EXAMPLES = 150


async def test_no_field_of_submit_offer_stage_datagram_or_http_crashes_or_hangs_an_agent(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    port = free_port()
    agent = cluster.start("fuzzed", metrics_listen=f"127.0.0.1:{port}", http_listen="127.0.0.1:0")
    registered = await etcd_client.get(KeySpace(prefix, "west").agent("fuzzed"))
    assert registered is not None
    gossip = json.loads(registered.value)["gossip_address"]
    trust, tally = cluster.trust, Tally()
    fuzz_submit(agent.address, trust.user("fuzzer"), EXAMPLES, tally)
    fuzz_offer(
        agent.peer_address, cluster.as_agent("east-1", "east"), "west", "east", EXAMPLES, tally
    )
    peer, user = cluster.as_agent("west-9", "west"), trust.user("fuzzer")
    fuzz_stage(agent.address, agent.peer_address, peer, user, EXAMPLES, tally)
    key = trust.gossip_key_file.read_text().split()[0].encode()
    fuzz_gossip(gossip, Keyring((key,)), ["fuzzed"], EXAMPLES, tally)
    token = trust.user("fuzzer").token
    assert token is not None
    fuzz_http(agent.http_url, trust.ca.read_bytes(), token, EXAMPLES, tally)
    anyone = Security(trust.mesh, trust.ca.read_bytes())
    still_well(agent.address, anyone, f"http://127.0.0.1:{port}/metrics", tally)
    assert tally.failures == []
    assert tally.statuses["datagram sent"] == EXAMPLES
    assert sum(n for k, n in tally.statuses.items() if k.startswith("Submit")) == EXAMPLES
    assert tally.statuses["RunStage OK"] > 0  # some stages got past every check and ran
    assert sum(n for k, n in tally.statuses.items() if k.startswith("HTTP")) == EXAMPLES
