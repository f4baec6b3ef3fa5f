"""Gossip of load and loaded models among the agents of a DC, and DC summaries across DCs.

etcd says who is a member; gossip says how busy each member is, every few hundred
milliseconds, which etcd should not be asked to carry. One concern per module, as in
memberlist: ``state`` (the table and its merge rule), ``wire`` (frames, HMAC keyring,
replay guard, size caps), ``protocol`` (push-pull rounds as pure functions of time and
input), ``transport`` (the UDP socket and the asyncio loop around them).
"""
