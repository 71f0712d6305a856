"""Per-request sampling parameters: parsing, normalisation and validation.

Ranges follow what SGLang/vLLM accept so that clients written against them behave the same here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from gridserve.errors import InvalidParamError

# Temperatures below this are treated as greedy: dividing logits by ~0 only produces inf/NaN,
# and the distribution is a point mass on the argmax anyway (vLLM and SGLang do the same).
SAMPLING_EPS = 1e-5

# Seeds may be any 64-bit value, signed or unsigned (the range torch.manual_seed accepts);
# the sampler reduces them mod 2**64, so -1 and 2**64 - 1 name the same stream.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
)
_INT_FIELDS = ("max_new_tokens", "top_k", "n")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens")


def _is_int(v: Any) -> bool:
    # bool is an int subclass, but `"n": true` is a client bug, not a count.
    return isinstance(v, int) and not isinstance(v, bool)


# Bounds that keep one request from costing everyone else: choices per prompt (OpenAI allows 128), and stop
# strings and stop token ids, which are checked on every new token of the request.
MAX_N = 128
MAX_STOP_STRINGS = 32
MAX_STOP_LEN = 512
MAX_STOP_TOKEN_IDS = 1024
# Integers bound for the schedulers must fit in 64 bits: messages between nodes are msgpack, which cannot carry a
# top_k or stop token id of 10**30 (a larger top_k means no limit anyway, a larger id matches no token).
MAX_INT64 = 2**63 - 1

# The range of every numeric field, as JSON Schema keywords: verify() enforces them, and the HTTP API's OpenAPI schema
# publishes them (json_schema()), so the two cannot disagree.
BOUNDS: dict[str, dict[str, int]] = {
    "max_new_tokens": {"minimum": 0},
    "temperature": {"minimum": 0},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1, "maximum": MAX_INT64},  # -1 and 0: no limit
    "min_p": {"minimum": 0, "maximum": 1},
    "repetition_penalty": {"exclusiveMinimum": 0},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "n": {"minimum": 1, "maximum": MAX_N},
    "seed": {"minimum": SEED_MIN, "maximum": SEED_MAX},
}
_NOTES = {"top_k": " (-1 or 0: no limit)"}


def _within(v: int | float, bounds: dict[str, int]) -> bool:
    return (("minimum" not in bounds or v >= bounds["minimum"])
            and ("exclusiveMinimum" not in bounds or v > bounds["exclusiveMinimum"])
            and ("maximum" not in bounds or v <= bounds["maximum"]))


def _describe(bounds: dict[str, int]) -> str:
    """`in (0, 1]`, `>= 0`, ... for error messages."""
    low = f"[{bounds['minimum']}" if "minimum" in bounds else f"({bounds['exclusiveMinimum']}"
    if "maximum" in bounds:
        return f"in {low}, {bounds['maximum']}]"
    return (">= " if low[0] == "[" else "> ") + low[1:]


def field_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one SamplingParams field as a request gives it (null: the default)."""
    if name in _FLOAT_FIELDS:
        return {"type": ["number", "null"], **BOUNDS[name]}
    if name in BOUNDS:  # the integers
        return {"type": ["integer", "null"], **BOUNDS[name]}
    if name in _BOOL_FIELDS:
        return {"type": ["boolean", "null"]}
    if name == "stop":
        text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]}
    if name == "stop_token_ids":
        return {"type": ["array", "null"], "maxItems": MAX_STOP_TOKEN_IDS,
                "items": {"type": "integer", "minimum": 0, "maximum": MAX_INT64}}
    raise KeyError(name)


def json_integers(d: Any) -> Any:
    """A JSON request's sampling dict with integral floats in its integer fields made ints: JSON has one number type
    and JSON Schema's `integer` admits 2.0, so an HTTP client's n=2.0 is n=2. (from_dict itself keeps Python's types
    strict: there, 2.0 for n is a bug.)"""
    if not isinstance(d, dict):
        return d

    def integral(v: Any) -> Any:
        return int(v) if isinstance(v, float) and v.is_integer() else v

    out = {k: integral(v) if k in _INT_FIELDS or k == "seed" else v for k, v in d.items()}
    if isinstance(out.get("stop_token_ids"), list):
        out["stop_token_ids"] = [integral(t) for t in out["stop_token_ids"]]
    return out


def is_encodable(text: str) -> bool:
    """False for text the tokenizer and JSON cannot take (lone UTF-16 surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error message never echoes a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0 on input) = disabled; stored as -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    stop: list[str] = field(default_factory=list)  # input may be str | list[str] | None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        # Normalise the lenient input forms; never raise here, verify() reports bad values.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if _is_int(self.top_k) and self.top_k == 0:
            self.top_k = -1
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if _is_int(v):
                setattr(self, name, float(v))

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingParams:
        """Build from a JSON-like dict. A None value means "use the default" (OpenAI SDKs send nulls)."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise InvalidParamError("sampling_params", f"must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidParamError(str(key), "unknown sampling parameter")
        params = cls(**{k: v for k, v in d.items() if v is not None})
        params.verify()
        return params

    def verify(self) -> None:
        """Raise InvalidParamError naming the first bad field, its allowed range and the value."""
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not (isinstance(v, float) or _is_int(v)) or not math.isfinite(v):
                raise InvalidParamError(name, f"must be a finite number, got {v!r}")
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise InvalidParamError(name, f"must be an integer, got {getattr(self, name)!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidParamError(name, f"must be a boolean, got {getattr(self, name)!r}")

        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidParamError(name, f"must be {allowed}, got {short_repr(getattr(self, name))}")

        check("seed", self.seed is None or _is_int(self.seed), "null or an integer")
        for name, bounds in BOUNDS.items():
            if getattr(self, name) is not None:
                check(name, _within(getattr(self, name), bounds), _describe(bounds) + _NOTES.get(name, ""))
        check(
            "stop",
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "a non-empty string or a list of non-empty strings",
        )
        check("stop", len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_LEN for s in self.stop),
              f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LEN} characters")
        check("stop", all(is_encodable(s) for s in self.stop), "valid Unicode (no lone surrogates)")
        ids = self.stop_token_ids
        check("stop_token_ids", isinstance(ids, list) and len(ids) <= MAX_STOP_TOKEN_IDS
              and all(_is_int(t) and 0 <= t <= MAX_INT64 for t in ids),
              f"a list of at most {MAX_STOP_TOKEN_IDS} integers in [0, {MAX_INT64}]")

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of from_dict's input: these fields, nothing else."""
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: field_schema(f.name) for f in fields(cls)}}

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
