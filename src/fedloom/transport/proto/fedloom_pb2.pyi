from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstructionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTRUCTION_KIND_UNSPECIFIED: _ClassVar[InstructionKind]
    INSTRUCTION_KIND_TRAIN: _ClassVar[InstructionKind]
    INSTRUCTION_KIND_EVALUATE: _ClassVar[InstructionKind]
    INSTRUCTION_KIND_FINISHED: _ClassVar[InstructionKind]

class Ending(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDING_UNSPECIFIED: _ClassVar[Ending]
    ENDING_COMPLETED: _ClassVar[Ending]
    ENDING_STOPPED: _ClassVar[Ending]
    ENDING_CANCELLED: _ClassVar[Ending]
INSTRUCTION_KIND_UNSPECIFIED: InstructionKind
INSTRUCTION_KIND_TRAIN: InstructionKind
INSTRUCTION_KIND_EVALUATE: InstructionKind
INSTRUCTION_KIND_FINISHED: InstructionKind
ENDING_UNSPECIFIED: Ending
ENDING_COMPLETED: Ending
ENDING_STOPPED: Ending
ENDING_CANCELLED: Ending

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainSettings(_message.Message):
    __slots__ = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "proximal_mu", "evaluate")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    proximal_mu: float
    evaluate: bool
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., evaluate: _Optional[bool] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("round", "kind", "settings", "config_json", "exchange_steps", "attempt_id", "privacy_json", "ending")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_JSON_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    round: int
    kind: InstructionKind
    settings: TrainSettings
    config_json: str
    exchange_steps: _containers.RepeatedScalarFieldContainer[str]
    attempt_id: str
    privacy_json: str
    ending: Ending
    def __init__(self, round: _Optional[int] = ..., kind: _Optional[_Union[InstructionKind, str]] = ..., settings: _Optional[_Union[TrainSettings, _Mapping]] = ..., config_json: _Optional[str] = ..., exchange_steps: _Optional[_Iterable[str]] = ..., attempt_id: _Optional[str] = ..., privacy_json: _Optional[str] = ..., ending: _Optional[_Union[Ending, str]] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "tensors", "attempt_id", "signature")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    attempt_id: str
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., attempt_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor", "offset", "data", "checksum")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    data: bytes
    checksum: int
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "num_samples", "metrics", "tensors", "attempt_id", "audit_hash", "local_steps")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HASH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    attempt_id: str
    audit_hash: str
    local_steps: int
    def __init__(self, round: _Optional[int] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., attempt_id: _Optional[str] = ..., audit_hash: _Optional[str] = ..., local_steps: _Optional[int] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("round", "accepted", "reason", "bytes_received", "signature", "resend")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RESEND_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    reason: str
    bytes_received: int
    signature: bytes
    resend: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ..., signature: _Optional[bytes] = ..., resend: _Optional[bool] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("round", "reason", "attempt_id", "withdrawn")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    attempt_id: str
    withdrawn: bool
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ..., attempt_id: _Optional[str] = ..., withdrawn: _Optional[bool] = ...) -> None: ...

class ExchangeMessage(_message.Message):
    __slots__ = ("round", "step", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: int
    step: str
    payload: bytes
    def __init__(self, round: _Optional[int] = ..., step: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "plan_hash", "site")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    plan_hash: str
    site: str
    def __init__(self, protocol_version: _Optional[int] = ..., plan_hash: _Optional[str] = ..., site: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "federation", "rounds", "heartbeat_seconds", "certificate")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    federation: str
    rounds: int
    heartbeat_seconds: float
    certificate: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., federation: _Optional[str] = ..., rounds: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class InstructionRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    def __init__(self, wait_seconds: _Optional[float] = ...) -> None: ...

class InstructionReply(_message.Message):
    __slots__ = ("instruction",)
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    instruction: Instruction
    def __init__(self, instruction: _Optional[_Union[Instruction, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class DownloadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    end: StreamEnd
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("open_round", "finished")
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    open_round: int
    finished: bool
    def __init__(self, open_round: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
