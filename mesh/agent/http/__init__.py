"""HTTP/JSON beside gRPC on every agent, and the web console: the same RPCs, the same
identities and roles, the protos as the one schema (``routes`` maps them, ``openapi``
describes them, ``gateway`` serves them, ``ui/`` is the console)."""
