"""The deterministic simulator: the mesh's real agent code in one process, on one event
loop with virtual time, over simulated ports (a DC store, peers, GPUs). ``python -m sim``.

Not installed with the package (like ``chaos`` and ``bench``): it is how the mesh is
proven, not part of it.
"""
