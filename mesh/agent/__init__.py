"""One agent: its parts, its lifecycle, and its edges.

``agent`` builds the parts and runs the lifecycle; ``view`` feeds the router; ``submission``,
``placement`` and ``intake`` are where tasks are recorded, sent and received;
``executor`` and ``reporting`` run tasks on GPU slots and record their runs; ``tasks``
reads and cancels tasks anywhere; ``owner`` and ``dispatch`` are the DC's queue owner and
its backlog; ``handover`` gives work back; ``speaker`` and ``remote`` reach other DCs;
``api`` is the narrow facade the edges use, ``service`` the gRPC edge, ``main`` the
process. Background work is supervised by ``duties``. May import ``core``, ``store``,
``gossip`` and the base modules; nothing from ``local`` or ``cli``.
"""
