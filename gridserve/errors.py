"""Errors that carry the offending field, so every front end can report it the same way."""


class InvalidParamError(ValueError):
    """A user-supplied value is wrong. `param` names the field (OpenAI's error.param)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class RequestTooLargeError(InvalidParamError):
    """The request can never fit (context length or KV pool)."""
