"""gpumesh: a peer-to-peer mesh of GPU agents coordinated through etcd.

Packages mirror the design (``../shared/DESIGN.md``), lowest layer first: ``core`` (pure
decisions), the shared base modules here (errors, config, topology, gpus, metrics,
logs, channels, client, pipelines, the generated ``v1`` stubs), the adapters ``store``
(etcd) and ``gossip`` (UDP), ``agent`` (one agent, its gRPC edge), ``local`` (a mesh on
one machine) and ``cli`` (``meshctl``). No import runs upward; ``tests/core/test_layering.py``
keeps it so.
"""

__version__ = "0.1.0"
