"""systemd's readiness protocol (``Type=notify``): one datagram per state change to the
socket systemd names in ``NOTIFY_SOCKET``. Without it (not under systemd) nothing is sent.

``READY=1`` goes once the agent serves (ports bound, member of its DC), so ``systemctl
start`` returns only then and units ordered after it start against a live agent;
``STOPPING=1`` with a ``STATUS=`` line while it drains, so ``systemctl status`` says why a
stop takes its time. The protocol is a plain datagram: no library for it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(**fields: str) -> bool:
    """Send ``KEY=value`` lines to systemd; whether a manager was told."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
    return True
