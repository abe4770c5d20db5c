"""The lpipes exception family.

Every error a user can cause (bad config, missing files, a span out of range, a
prompt that does not fit) is an :class:`LpipesError` with a message that says what
failed, what was expected and how to fix it. Subclasses also derive from the
closest builtin so generic handlers keep working.
"""

from __future__ import annotations


class LpipesError(Exception):
    """Base class of every error lpipes raises on purpose."""


class CheckpointError(LpipesError, ValueError):
    """A checkpoint is missing, incomplete or malformed."""


class UnsupportedArchitectureError(LpipesError, ValueError):
    """The checkpoint's architecture (``model_type``) is not one lpipes can run."""


class LayerSpanError(LpipesError, ValueError):
    """A requested layer span is empty, out of range or cuts a dependency between layers."""


class ContextLengthError(LpipesError, ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context window."""

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_length: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


class SessionError(LpipesError, KeyError):
    """An operation named a session the executor does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class NetworkError(LpipesError, ConnectionError):
    """The peer network cannot run a step right now (the API answers 503: retry later)."""


class NoRouteError(NetworkError):
    """No chain of live peers covers the layers a request needs."""


class RouteFailedError(NetworkError):
    """A hop of the route failed during a step; the peer (``node_id``) is marked unless it is only
    full (``capacity``), and the step can be replayed on a new route (the engine does so from each
    session's token history)."""

    def __init__(self, message: str, node_id: str | None = None, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.capacity = capacity
