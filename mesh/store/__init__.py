"""The etcd adapters, thin: the client and its errors, the key layout, the lease session,
a prefix mirror, membership, task records, the election recipe and the applied topology.

Each speaks in records and revisions; only ``etcd`` knows the client is aetcd. May
import ``mesh.core`` and the base modules; nothing from ``agent``, ``local`` or ``cli``.
"""
