"""Typed msgpack for messages that cross nodes: only the message dataclasses listed here can be decoded, field
by field, so a peer on the network can send data but never code (pickle would run whatever it was given).

A dataclass travels as a map with its type name under "__t"; tuples arrive as lists."""

import dataclasses

import msgpack

from gridserve import messages
from gridserve.sampling.sampling_params import SamplingParams

_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    messages.TokenizedGenerateReq, messages.AbortReq, messages.FlushCacheReq, messages.GetInternalStateReq,
    messages.RpcOutput, messages.SchedulerStats, messages.DetokInit, messages.ReqOutputs,
    messages.BatchTokenIDOutput, messages.BatchStrOutput, messages.NodeMessage, SamplingParams)}
_TAG = "__t"


def _default(obj):
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and _TYPES.get(cls.__name__) is cls:
        return {_TAG: cls.__name__, **{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}}
    raise TypeError(f"{cls.__name__} cannot cross nodes")


def _hook(d: dict):
    name = d.pop(_TAG, None)
    if name is None:
        return d
    cls = _TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown message type {name!r}")
    return cls(**d)


def encode(obj: object) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes) -> object:
    return msgpack.unpackb(data, object_hook=_hook, raw=False, strict_map_key=False)
