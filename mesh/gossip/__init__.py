"""Gossip of load and loaded models among the agents of a DC.

etcd says who is a member; gossip says how busy each member is, every few hundred
milliseconds, which etcd should not be asked to carry. One concern per module, as in
memberlist: ``state`` (the table and its merge rule), ``wire`` (frames, HMAC keyring,
replay guard, size caps; the only module that calls msgpack), ``protocol`` (push-pull
rounds as pure functions of time and input), ``transport`` (the UDP socket and the
asyncio loop around them), ``memory`` (a simulated network for tests and benchmarks).
May import ``mesh.core`` and the base modules; nothing from ``store``, ``agent`` or above.
"""
