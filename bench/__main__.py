"""``python -m bench {route,gossip,failover,fuzz,hop,cancel,e2e,scale,layers,tenants,globalcap,
placement} [--json]``."""

from __future__ import annotations

import sys

from bench import (
    cancel,
    e2e,
    failover,
    fuzz,
    globalcap,
    gossip,
    hop,
    layers,
    placement,
    route,
    scale,
    tenants,
)

BENCHMARKS = {
    "route": route.main,
    "gossip": gossip.main,
    "failover": failover.main,
    "fuzz": fuzz.main,
    "hop": hop.main,
    "cancel": cancel.main,
    "e2e": e2e.main,
    "scale": scale.main,
    "layers": layers.main,
    "tenants": tenants.main,
    "globalcap": globalcap.main,
    "placement": placement.main,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [--json] [--help]")
        sys.exit(2)
    BENCHMARKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
