"""The mesh's trust material: its certificate authority and the certificates it issues
(``pki``), and the bearer tokens it signs and checks (``tokens``). Base layer: used by
the agent, the local mesh and ``meshctl``; imports ``mesh.core`` and the base modules."""
