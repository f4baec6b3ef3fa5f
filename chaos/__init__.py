"""The chaos suite: real faults against a real two-DC mesh, judged from its history.

``python -m chaos run`` brings up the mesh (``chaos.mesh``) in network namespaces where
it can (``chaos.net``), puts load on it (``chaos.load``), stages each fault
(``chaos.scenarios``) and checks the invariants (``chaos.checker``) from the history
that agents, clients and the fault schedule write.
"""
