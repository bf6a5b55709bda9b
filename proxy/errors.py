"""The one exception tree: every error the proxy answers with knows its HTTP status and code.

The pipeline's error middleware turns these into the provider's own error body shape.
"""
from __future__ import annotations


class ProxyError(Exception):
    """An error answered to the client. `code` is OpenAI-style; adapters map it to their shape."""

    status = 500
    code = "internal_error"
    # OpenAI's error `type` and Anthropic's `error.type` for this error.
    openai_type = "server_error"
    anthropic_type = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    code = "invalid_api_key"
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"


class NotFound(ProxyError):
    status = 404
    code = "not_found"
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class RequestTimeout(ProxyError):
    """The client took too long to send its request body (slow-loris)."""

    status = 408
    code = "request_timeout"
    openai_type = "invalid_request_error"
    anthropic_type = "timeout_error"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "request_too_large"
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"


class RateLimited(ProxyError):
    """A quota or throttling limit refused the request (429)."""

    status = 429
    code = "rate_limit_exceeded"
    openai_type = "requests"
    anthropic_type = "rate_limit_error"


class QuotaExhausted(RateLimited):
    """A spend budget is used up: retrying soon will not help."""

    code = "insufficient_quota"
    openai_type = "insufficient_quota"


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"
    openai_type = "server_error"
    anthropic_type = "api_error"


class StoreUnavailable(ProxyError):
    status = 503
    code = "store_unavailable"
    openai_type = "server_error"
    anthropic_type = "api_error"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    openai_type = "server_error"
    anthropic_type = "timeout_error"


class ConfigError(Exception):
    """A config file is invalid. The message names the file, the field and the problem."""


class StoreError(Exception):
    """The quota store could not be reached or answered wrongly (wraps redis errors)."""
