from specdec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("context", "k", "sampling", "features", "features_start", "provisional_tokens", "tree_nodes", "min_confidence")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_START_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.SessionContext
    k: int
    sampling: _common_pb2.SamplingParams
    features: _common_pb2.Tensor
    features_start: int
    provisional_tokens: _containers.RepeatedScalarFieldContainer[int]
    tree_nodes: int
    min_confidence: float
    def __init__(self, context: _Optional[_Union[_common_pb2.SessionContext, _Mapping]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., features: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., features_start: _Optional[int] = ..., provisional_tokens: _Optional[_Iterable[int]] = ..., tree_nodes: _Optional[int] = ..., min_confidence: _Optional[float] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("tokens", "probs", "point_mass", "timings", "cache", "features_from", "parents", "confidences")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    POINT_MASS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FROM_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: _common_pb2.Tensor
    point_mass: bool
    timings: _common_pb2.Timings
    cache: _common_pb2.CacheUse
    features_from: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    confidences: _common_pb2.Tensor
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., point_mass: _Optional[bool] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., cache: _Optional[_Union[_common_pb2.CacheUse, _Mapping]] = ..., features_from: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ..., confidences: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
