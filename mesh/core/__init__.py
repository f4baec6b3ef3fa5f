"""The pure core: every decision the mesh makes, with no I/O.

The weighted hash ring, the bounded-load router and its types, the spill cap, the queue
discipline, the backlog's entries and rounds, admission of a task, how a record is born
and changes state, DC summaries, the clock helpers and the data a task travels in. It
may import ``mesh.errors``, ``mesh.config`` and the generated ``_pb2`` messages; never
grpc, aetcd, msgpack or yaml, by any chain of imports. Time is passed in where a decision
must be replayable; everything here is tested without starting a process.
"""
