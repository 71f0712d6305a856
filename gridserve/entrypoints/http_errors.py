"""The errors a request can end with, as the OpenAI-style `{"error": {...}}` body and HTTP status every route
sends, and the checks that raise them before any work starts."""

import json
import logging
import math
from typing import Any

from gridserve.errors import InvalidParamError
from gridserve.managers.tokenizer_manager import SchedulerDeadError, ServerBusyError
from gridserve.sampling.sampling_params import short_repr

logger = logging.getLogger(__name__)

# Most generations (prompts x n) one HTTP request may ask for: each is a scheduler request.
MAX_PROMPTS = 1024
# Longest integer a request body may hold: every integer field fits in 20 digits, and a 10**30 still gets its field's
# own error, while int() of thousands of digits (quadratic) never runs.
MAX_INT_DIGITS = 100


class OpenAIError(Exception):
    """Ends a request with `{"error": {...}}` and an HTTP status, from anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


def bad_request(e: InvalidParamError, renames: dict[str, str] | None = None) -> OpenAIError:
    """A 400 naming the field as the client spelt it (e.g. SamplingParams' max_new_tokens is max_tokens)."""
    param = (renames or {}).get(e.param, e.param)
    return OpenAIError(400, f"{param}: {e.message}", param=param)


def abort_error(reason: dict, completion_tokens: int, dead_reason: str | None) -> OpenAIError:
    """An "abort" finish means the scheduler failed or refused the request: say which, with a fitting status."""
    message = reason.get("message") or "the request was aborted"
    if dead_reason:
        return OpenAIError(503, f"the server is shutting down: {dead_reason}", code="service_unavailable")
    if reason.get("status_code") == 503:  # the scheduler's queue is full: retry later
        return OpenAIError(503, message, code="queue_full", err_type="server_error")
    if completion_tokens == 0:  # refused at admission: the scheduler found the request itself invalid
        return OpenAIError(400, message)
    return OpenAIError(500, f"generation failed: {message}")


def as_openai_error(e: Exception) -> OpenAIError:
    """Any failure as the error a client should see; unexpected ones are logged with their traceback."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, InvalidParamError):
        return bad_request(e)
    if isinstance(e, SchedulerDeadError):
        return OpenAIError(503, f"the server is shutting down: {e}", code="service_unavailable")
    if isinstance(e, TimeoutError):
        return OpenAIError(503, "the scheduler did not answer in time", code="service_unavailable")
    if isinstance(e, ServerBusyError):
        return OpenAIError(503, f"the server is busy: {e}", code="service_unavailable")
    logger.error("request failed", exc_info=e)
    return OpenAIError(500, f"internal error: {e!r}")


def check_alive(tm) -> None:
    if tm.dead_reason:
        raise OpenAIError(503, f"the server is shutting down: {tm.dead_reason}", code="service_unavailable")


def check_model(requested: str | None, served: str) -> None:
    """Clients often send a placeholder model name; the server has exactly one model."""
    if requested not in (None, "", "default", served):
        raise OpenAIError(404, f"The model {short_repr(requested)} does not exist; this server serves `{served}`.",
                          param="model", code="model_not_found")


def check_batch_size(prompts: int, n: int, param: str = "prompt") -> None:
    """One HTTP request may fan out into at most MAX_PROMPTS scheduler requests (prompts x n)."""
    if prompts * n > MAX_PROMPTS:
        raise OpenAIError(400, f"{param}: {prompts} prompts x n={n} = {prompts * n} generations, more than the "
                          f"{MAX_PROMPTS} one request may ask for; split it", param=param)


def check_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON object a request body holds, or the error that says what is wrong with it: no body, not sent as
    application/json (415), not UTF-8, not JSON (RFC 8259: no NaN or Infinity; numbers must fit a double, integers
    MAX_INT_DIGITS digits), nested deeper than the parser goes, or not an object."""
    if not raw.strip():
        raise OpenAIError(400, "the request body is empty: send a JSON object")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        got = f"Content-Type {short_repr(content_type)}" if content_type else "no Content-Type"
        raise OpenAIError(415, f"the request body must be JSON sent as Content-Type: application/json, got {got}",
                          code="unsupported_media_type")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenAIError(400, f"the request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}",
                          code="invalid_json") from None
    try:
        value = json.loads(text.removeprefix("\ufeff"), parse_constant=_no_constant, parse_float=_finite_float,
                           parse_int=_short_int)
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                          code="invalid_json") from None
    except RecursionError:  # a nesting bomb, such as 100,000 `[`: json gives up at Python's recursion limit
        raise OpenAIError(400, "the request body is not valid JSON: arrays or objects are nested too deeply",
                          code="invalid_json") from None
    except ValueError as e:  # from the parse_* hooks
        raise OpenAIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {_json_type(value)}")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {short_repr(text, 40)} is too large for a double")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is more than the {MAX_INT_DIGITS} allowed")
    return int(text)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
