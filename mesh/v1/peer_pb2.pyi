from mesh.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("spec", "path", "hops", "deadline_unix_ms", "attempt", "entry_agent", "max_tasks", "origin_dc", "traceparent", "reclaim", "waited_s")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_AGENT_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_DC_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    spec: _tasks_pb2.TaskSpec
    path: _containers.RepeatedScalarFieldContainer[str]
    hops: int
    deadline_unix_ms: int
    attempt: int
    entry_agent: str
    max_tasks: float
    origin_dc: str
    traceparent: str
    reclaim: bool
    waited_s: float
    def __init__(self, spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ..., path: _Optional[_Iterable[str]] = ..., hops: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., attempt: _Optional[int] = ..., entry_agent: _Optional[str] = ..., max_tasks: _Optional[float] = ..., origin_dc: _Optional[str] = ..., traceparent: _Optional[str] = ..., reclaim: _Optional[bool] = ..., waited_s: _Optional[float] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running", "queued", "models_loaded")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    models_loaded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., models_loaded: _Optional[_Iterable[str]] = ...) -> None: ...

class OfferResponse(_message.Message):
    __slots__ = ("accepted", "reason", "load")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    load: Load
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class DcSummary(_message.Message):
    __slots__ = ("dc", "ts_unix_ms", "agents", "slots", "tasks", "capacity", "models_loaded", "live", "global_held", "demand")
    class GlobalHeldEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DemandEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DC_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HELD_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    dc: str
    ts_unix_ms: int
    agents: int
    slots: int
    tasks: int
    capacity: int
    models_loaded: _containers.RepeatedScalarFieldContainer[str]
    live: _containers.RepeatedScalarFieldContainer[str]
    global_held: _containers.ScalarMap[str, int]
    demand: _containers.ScalarMap[str, float]
    def __init__(self, dc: _Optional[str] = ..., ts_unix_ms: _Optional[int] = ..., agents: _Optional[int] = ..., slots: _Optional[int] = ..., tasks: _Optional[int] = ..., capacity: _Optional[int] = ..., models_loaded: _Optional[_Iterable[str]] = ..., live: _Optional[_Iterable[str]] = ..., global_held: _Optional[_Mapping[str, int]] = ..., demand: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("task_id", "origin_dc")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_DC_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    origin_dc: str
    def __init__(self, task_id: _Optional[str] = ..., origin_dc: _Optional[str] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("outcome",)
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[SettleResponse.Outcome]
        OUTCOME_HELD: _ClassVar[SettleResponse.Outcome]
        OUTCOME_NOT_HELD: _ClassVar[SettleResponse.Outcome]
        OUTCOME_IN_PROGRESS: _ClassVar[SettleResponse.Outcome]
    OUTCOME_UNSPECIFIED: SettleResponse.Outcome
    OUTCOME_HELD: SettleResponse.Outcome
    OUTCOME_NOT_HELD: SettleResponse.Outcome
    OUTCOME_IN_PROGRESS: SettleResponse.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: SettleResponse.Outcome
    def __init__(self, outcome: _Optional[_Union[SettleResponse.Outcome, str]] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("task_id", "dc", "spec_digest", "lookup", "stale_holder")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    SPEC_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    STALE_HOLDER_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    dc: str
    spec_digest: str
    lookup: bool
    stale_holder: str
    def __init__(self, task_id: _Optional[str] = ..., dc: _Optional[str] = ..., spec_digest: _Optional[str] = ..., lookup: _Optional[bool] = ..., stale_holder: _Optional[str] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("held", "dc", "spec_digest", "claimed_at_ms")
    HELD_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    SPEC_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    held: bool
    dc: str
    spec_digest: str
    claimed_at_ms: int
    def __init__(self, held: _Optional[bool] = ..., dc: _Optional[str] = ..., spec_digest: _Optional[str] = ..., claimed_at_ms: _Optional[int] = ...) -> None: ...

class TaskRecord(_message.Message):
    __slots__ = ("status", "spec_digest", "cancel_requested", "forwarded_to_dc", "payload_not_kept", "backlog_entry", "traceparent", "superseded_by_dc", "cancel_reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_TO_DC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_NOT_KEPT_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_ENTRY_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_DC_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    status: _tasks_pb2.TaskStatus
    spec_digest: str
    cancel_requested: bool
    forwarded_to_dc: str
    payload_not_kept: bool
    backlog_entry: str
    traceparent: str
    superseded_by_dc: str
    cancel_reason: str
    def __init__(self, status: _Optional[_Union[_tasks_pb2.TaskStatus, _Mapping]] = ..., spec_digest: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., forwarded_to_dc: _Optional[str] = ..., payload_not_kept: _Optional[bool] = ..., backlog_entry: _Optional[str] = ..., traceparent: _Optional[str] = ..., superseded_by_dc: _Optional[str] = ..., cancel_reason: _Optional[str] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("spec", "attempt", "first", "count", "input")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    spec: _tasks_pb2.TaskSpec
    attempt: int
    first: int
    count: int
    input: bytes
    def __init__(self, spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ..., attempt: _Optional[int] = ..., first: _Optional[int] = ..., count: _Optional[int] = ..., input: _Optional[bytes] = ...) -> None: ...

class StageResponse(_message.Message):
    __slots__ = ("output", "cold")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    output: bytes
    cold: bool
    def __init__(self, output: _Optional[bytes] = ..., cold: _Optional[bool] = ...) -> None: ...
