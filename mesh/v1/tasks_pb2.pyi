import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_T2I: _ClassVar[TaskType]
    TASK_TYPE_I2I: _ClassVar[TaskType]
    TASK_TYPE_SUPER_RESOLUTION: _ClassVar[TaskType]
    TASK_TYPE_TTS: _ClassVar[TaskType]
    TASK_TYPE_LLM: _ClassVar[TaskType]
    TASK_TYPE_CUSTOM: _ClassVar[TaskType]

class TaskClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_CLASS_UNSPECIFIED: _ClassVar[TaskClass]
    TASK_CLASS_ONLINE: _ClassVar[TaskClass]
    TASK_CLASS_BATCH: _ClassVar[TaskClass]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_PENDING: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_T2I: TaskType
TASK_TYPE_I2I: TaskType
TASK_TYPE_SUPER_RESOLUTION: TaskType
TASK_TYPE_TTS: TaskType
TASK_TYPE_LLM: TaskType
TASK_TYPE_CUSTOM: TaskType
TASK_CLASS_UNSPECIFIED: TaskClass
TASK_CLASS_ONLINE: TaskClass
TASK_CLASS_BATCH: TaskClass
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState

class User(_message.Message):
    __slots__ = ("id", "group", "role")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    group: str
    role: str
    def __init__(self, id: _Optional[str] = ..., group: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("task_id", "user", "task_type", "pipeline", "model", "queue", "payload", "params", "deadline", "affinity_key", "gpu_count", "min_gpu_memory_mb", "timeout", "task_class", "no_preempt", "rerun_of")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_KEY_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_GPU_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TASK_CLASS_FIELD_NUMBER: _ClassVar[int]
    NO_PREEMPT_FIELD_NUMBER: _ClassVar[int]
    RERUN_OF_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    user: User
    task_type: TaskType
    pipeline: str
    model: str
    queue: str
    payload: bytes
    params: _containers.ScalarMap[str, str]
    deadline: _timestamp_pb2.Timestamp
    affinity_key: str
    gpu_count: int
    min_gpu_memory_mb: int
    timeout: _duration_pb2.Duration
    task_class: TaskClass
    no_preempt: bool
    rerun_of: str
    def __init__(self, task_id: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., task_type: _Optional[_Union[TaskType, str]] = ..., pipeline: _Optional[str] = ..., model: _Optional[str] = ..., queue: _Optional[str] = ..., payload: _Optional[bytes] = ..., params: _Optional[_Mapping[str, str]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., affinity_key: _Optional[str] = ..., gpu_count: _Optional[int] = ..., min_gpu_memory_mb: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., task_class: _Optional[_Union[TaskClass, str]] = ..., no_preempt: _Optional[bool] = ..., rerun_of: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    message: str
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("inline", "uri", "media_type")
    INLINE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    inline: bytes
    uri: str
    media_type: str
    def __init__(self, inline: _Optional[bytes] = ..., uri: _Optional[str] = ..., media_type: _Optional[str] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "state", "agent", "dc", "attempt", "progress", "created_at", "queued_at", "started_at", "finished_at", "result", "error", "spec", "deadline", "path", "preemptions", "trace_id", "expected_start")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_START_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    agent: str
    dc: str
    attempt: int
    progress: Progress
    created_at: _timestamp_pb2.Timestamp
    queued_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    result: Result
    error: TaskError
    spec: TaskSpec
    deadline: _timestamp_pb2.Timestamp
    path: _containers.RepeatedScalarFieldContainer[str]
    preemptions: int
    trace_id: str
    expected_start: _timestamp_pb2.Timestamp
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., agent: _Optional[str] = ..., dc: _Optional[str] = ..., attempt: _Optional[int] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., path: _Optional[_Iterable[str]] = ..., preemptions: _Optional[int] = ..., trace_id: _Optional[str] = ..., expected_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("status", "existing")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    existing: bool
    def __init__(self, status: _Optional[_Union[TaskStatus, _Mapping]] = ..., existing: _Optional[bool] = ...) -> None: ...

class SubmitStreamRequest(_message.Message):
    __slots__ = ("spec", "ref", "follow")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    ref: str
    follow: bool
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., ref: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class SubmitStreamResponse(_message.Message):
    __slots__ = ("ref", "submitted", "error", "ended")
    REF_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ref: str
    submitted: SubmitResponse
    error: TaskError
    ended: TaskStatus
    def __init__(self, ref: _Optional[str] = ..., submitted: _Optional[_Union[SubmitResponse, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., ended: _Optional[_Union[TaskStatus, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class RerunRequest(_message.Message):
    __slots__ = ("task_id", "new_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    new_task_id: str
    def __init__(self, task_id: _Optional[str] = ..., new_task_id: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("task_id", "resume_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    resume_token: str
    def __init__(self, task_id: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("kind", "status", "resume_token")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TaskEvent.Kind]
        KIND_STATE: _ClassVar[TaskEvent.Kind]
        KIND_PROGRESS: _ClassVar[TaskEvent.Kind]
    KIND_UNSPECIFIED: TaskEvent.Kind
    KIND_STATE: TaskEvent.Kind
    KIND_PROGRESS: TaskEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: TaskEvent.Kind
    status: TaskStatus
    resume_token: str
    def __init__(self, kind: _Optional[_Union[TaskEvent.Kind, str]] = ..., status: _Optional[_Union[TaskStatus, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("user_id", "state", "limit", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    state: TaskState
    limit: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("tasks", "truncated", "next_page_token", "unreachable_dcs")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_DCS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    truncated: bool
    next_page_token: str
    unreachable_dcs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., truncated: _Optional[bool] = ..., next_page_token: _Optional[str] = ..., unreachable_dcs: _Optional[_Iterable[str]] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("data", "media_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_mb", "gpu_class")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    GPU_CLASS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_mb: int
    gpu_class: str
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_mb: _Optional[int] = ..., gpu_class: _Optional[str] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "dc", "address", "gpus", "weight", "pipelines", "models", "models_loaded", "state", "incarnation", "running", "queued", "suspect", "mtls_address", "http_url", "metrics_url", "demand", "models_planned", "model_memory_mb")
    class DemandEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    MTLS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_URL_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    MODELS_PLANNED_FIELD_NUMBER: _ClassVar[int]
    MODEL_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    dc: str
    address: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    weight: float
    pipelines: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    models_loaded: _containers.RepeatedScalarFieldContainer[str]
    state: str
    incarnation: int
    running: int
    queued: int
    suspect: bool
    mtls_address: str
    http_url: str
    metrics_url: str
    demand: _containers.ScalarMap[str, float]
    models_planned: _containers.RepeatedScalarFieldContainer[str]
    model_memory_mb: int
    def __init__(self, agent_id: _Optional[str] = ..., dc: _Optional[str] = ..., address: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., weight: _Optional[float] = ..., pipelines: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., models_loaded: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., incarnation: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., suspect: _Optional[bool] = ..., mtls_address: _Optional[str] = ..., http_url: _Optional[str] = ..., metrics_url: _Optional[str] = ..., demand: _Optional[_Mapping[str, float]] = ..., models_planned: _Optional[_Iterable[str]] = ..., model_memory_mb: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("spec", "explain")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    explain: bool
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., explain: _Optional[bool] = ...) -> None: ...

class RouteTarget(_message.Message):
    __slots__ = ("kind", "name", "max_tasks", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    max_tasks: float
    reason: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., max_tasks: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class RouteCandidate(_message.Message):
    __slots__ = ("agent_id", "tasks", "max_tasks", "eligible", "model_loaded", "verdict")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    tasks: int
    max_tasks: float
    eligible: bool
    model_loaded: bool
    verdict: str
    def __init__(self, agent_id: _Optional[str] = ..., tasks: _Optional[int] = ..., max_tasks: _Optional[float] = ..., eligible: _Optional[bool] = ..., model_loaded: _Optional[bool] = ..., verdict: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("agent_id", "dc", "bound", "targets", "candidates", "quota")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    dc: str
    bound: float
    targets: _containers.RepeatedCompositeFieldContainer[RouteTarget]
    candidates: _containers.RepeatedCompositeFieldContainer[RouteCandidate]
    quota: str
    def __init__(self, agent_id: _Optional[str] = ..., dc: _Optional[str] = ..., bound: _Optional[float] = ..., targets: _Optional[_Iterable[_Union[RouteTarget, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[RouteCandidate, _Mapping]]] = ..., quota: _Optional[str] = ...) -> None: ...

class QueueRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueClass(_message.Message):
    __slots__ = ("name", "depth", "oldest_wait_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    depth: int
    oldest_wait_s: float
    def __init__(self, name: _Optional[str] = ..., depth: _Optional[int] = ..., oldest_wait_s: _Optional[float] = ...) -> None: ...

class QueueResponse(_message.Message):
    __slots__ = ("dc", "owner", "term", "classes", "remote")
    DC_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    dc: str
    owner: str
    term: int
    classes: _containers.RepeatedCompositeFieldContainer[QueueClass]
    remote: _containers.RepeatedCompositeFieldContainer[RemoteDc]
    def __init__(self, dc: _Optional[str] = ..., owner: _Optional[str] = ..., term: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[QueueClass, _Mapping]]] = ..., remote: _Optional[_Iterable[_Union[RemoteDc, _Mapping]]] = ...) -> None: ...

class RemoteDc(_message.Message):
    __slots__ = ("dc", "agents", "slots", "tasks", "capacity", "age_s", "in_flight", "demand")
    class DemandEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DC_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    dc: str
    agents: int
    slots: int
    tasks: int
    capacity: int
    age_s: float
    in_flight: int
    demand: _containers.ScalarMap[str, float]
    def __init__(self, dc: _Optional[str] = ..., agents: _Optional[int] = ..., slots: _Optional[int] = ..., tasks: _Optional[int] = ..., capacity: _Optional[int] = ..., age_s: _Optional[float] = ..., in_flight: _Optional[int] = ..., demand: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitQuotaRequest(_message.Message):
    __slots__ = ("group", "users", "remove")
    class UsersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    group: str
    users: _containers.ScalarMap[str, int]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., users: _Optional[_Mapping[str, int]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class QuotaSplit(_message.Message):
    __slots__ = ("group", "dc", "max_gpus", "users")
    class UsersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DC_FIELD_NUMBER: _ClassVar[int]
    MAX_GPUS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    group: str
    dc: str
    max_gpus: int
    users: _containers.ScalarMap[str, int]
    def __init__(self, group: _Optional[str] = ..., dc: _Optional[str] = ..., max_gpus: _Optional[int] = ..., users: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
