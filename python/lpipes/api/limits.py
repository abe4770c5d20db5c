"""The API's limits as plain values, shared by the configuration (``[api]`` in ``config.py``), the
request handlers (``server.py``) and the HTTP connection guards (``http.py``).

Kept free of Starlette, uvicorn and torch so that the configuration can name them without importing
the server. The defaults equal ``ApiConfig``'s, so a server built without a configuration file
(``lpipes demo``, tests) is protected the same way; ``docs/configuration.md`` explains each value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestLimits:
    """What each request may ask for; checked by the handlers before anything reaches the engine."""

    max_prompt_tokens: int = 0  # 0: the server's context length
    max_new_tokens: int = 4096  # 0: no cap but the context length
    max_body_bytes: int = 2 << 20
    body_timeout_s: float = 30.0


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP connection may hold; enforced below the application, on the connection itself."""

    max_connections: int = 128
    header_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
