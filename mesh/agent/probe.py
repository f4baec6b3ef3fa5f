"""``python -m mesh.agent.probe --config FILE``: exit 0 if the agent on this host answers
SERVING on its API port, 1 if not. For probes that cannot speak gRPC over TLS themselves
(Kubernetes' built-in gRPC probe has no TLS; compose's healthcheck runs a command): it
reads the agent's own configuration, so it checks the port and the CA the agent uses.
"""

from __future__ import annotations

import sys

from mesh.channels import Security, agent_healthy
from mesh.config import load_agent_config
from mesh.errors import ConfigError


def local(address: str) -> str:
    """``0.0.0.0:P`` or ``[::]:P`` as a probe on this host dials it."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else address


def main(argv: list[str]) -> int:
    try:
        cfg = load_agent_config(argv)
    except ConfigError as exc:
        print(f"probe: {exc.message}", file=sys.stderr)
        return 2
    if cfg.insecure:
        security = Security(cfg.mesh_name, insecure=True)
    else:
        security = Security.from_files(cfg.mesh_name, cfg.tls_ca)
    serving = agent_healthy(local(cfg.listen), security, timeout_s=2.0)
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
