"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status."""

from __future__ import annotations

# OpenAI's error ``type`` for each status the server answers with.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server refuses; becomes one JSON error object (never a traceback).

    Args:
        status: HTTP status (4xx for the client's mistakes).
        message: one line saying what is wrong and, where it helps, what to send instead.
        param: the request field at fault (``"messages[1].content"``), if any.
        code: OpenAI's machine-readable code (``"model_not_found"``, ``"context_length_exceeded"``).
        kind: OpenAI's error ``type``; derived from the status when None.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
