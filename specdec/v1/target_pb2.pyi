from specdec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyRequest(_message.Message):
    __slots__ = ("context", "draft_tokens", "sampling", "feature_start", "feature_layers", "draft_parents", "next_round")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FEATURE_START_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.SessionContext
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    feature_start: int
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    next_round: NextRound
    def __init__(self, context: _Optional[_Union[_common_pb2.SessionContext, _Mapping]] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., feature_start: _Optional[int] = ..., feature_layers: _Optional[_Iterable[int]] = ..., draft_parents: _Optional[_Iterable[int]] = ..., next_round: _Optional[_Union[NextRound, _Mapping]] = ...) -> None: ...

class NextRound(_message.Message):
    __slots__ = ("k", "tree_nodes", "min_confidence")
    K_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    k: int
    tree_nodes: int
    min_confidence: float
    def __init__(self, k: _Optional[int] = ..., tree_nodes: _Optional[int] = ..., min_confidence: _Optional[float] = ...) -> None: ...

class NextDrafts(_message.Message):
    __slots__ = ("follows", "tokens", "parents", "confidences", "compute_s")
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    follows: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    confidences: _common_pb2.Tensor
    compute_s: float
    def __init__(self, follows: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., confidences: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("argmax_tokens", "probs", "timings", "cache", "sampled_tokens", "features", "next_drafts")
    ARGMAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    argmax_tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: _common_pb2.Tensor
    timings: _common_pb2.Timings
    cache: _common_pb2.CacheUse
    sampled_tokens: _containers.RepeatedScalarFieldContainer[int]
    features: _common_pb2.Tensor
    next_drafts: NextDrafts
    def __init__(self, argmax_tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., cache: _Optional[_Union[_common_pb2.CacheUse, _Mapping]] = ..., sampled_tokens: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., next_drafts: _Optional[_Union[NextDrafts, _Mapping]] = ...) -> None: ...
