"""One root error with families; every family knows the HTTP status it maps to.

The data plane renders every gateway-made error through `tollgate.http.responses`, so the
status, the `type` string and the JSON shape live in exactly one place.
"""

from __future__ import annotations


class TollgateError(Exception):
    """Root of every error the gateway raises on purpose."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


# -- configuration -------------------------------------------------------------------------


class ConfigError(TollgateError):
    """A configuration that cannot be loaded. `problems` lists every located problem."""

    error_type = "config_error"

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConfigProblem:
    """One problem in a config file: where it is (file, line, dotted path) and what it is."""

    __slots__ = ("file", "line", "message", "path")

    def __init__(self, file: str, path: str, message: str, line: int | None = None) -> None:
        self.file = file
        self.path = path
        self.message = message
        self.line = line

    def __str__(self) -> str:
        """`file:line: path: message`, leaving out what is unknown."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"ConfigProblem({self.file!r}, line={self.line}, path={self.path!r}, {self.message!r})"
        )


# -- client side (the request the gateway received) ----------------------------------------


class ClientError(TollgateError):
    status = 400
    error_type = "bad_request"


class RequestHeaderTooLarge(ClientError):
    status = 431
    error_type = "request_header_too_large"


class RequestBodyTooLarge(ClientError):
    status = 413
    error_type = "request_body_too_large"


class RequestTimeout(ClientError):
    status = 408
    error_type = "request_timeout"


class NotFound(ClientError):
    status = 404
    error_type = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    error_type = "method_not_allowed"


class Unauthorized(ClientError):
    status = 401
    error_type = "unauthorized"


class Forbidden(ClientError):
    status = 403
    error_type = "forbidden"


# -- upstream side -------------------------------------------------------------------------


class UpstreamError(TollgateError):
    status = 502
    error_type = "upstream_error"


class UpstreamConnectError(UpstreamError):
    error_type = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    error_type = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "upstream_timeout"


class NoHealthyTarget(UpstreamError):
    status = 503
    error_type = "no_upstream_available"
