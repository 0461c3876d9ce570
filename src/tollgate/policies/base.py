"""The policy mechanism: a policy is one module holding its config model and its handler.

A policy acts in any of four phases, named after the methods it defines:

- ``access(exchange)`` before the upstream is called; returns ``None`` to go on, a
  `GatewayResponse` to answer at once (short-circuit), or an awaitable of either;
- ``upstream_response(exchange, status, headers)`` when the upstream's head arrives; `headers`
  is the upstream's list of (name, value) pairs, which it may edit in place;
- ``body(exchange, chunk)`` for each response body chunk; returns the bytes to send (b"" to
  hold them back). It is called once more with b"" when the body ends, to release what it
  held. A route with body-phase policies sends its responses chunked (the length may change);
- ``log(exchange)`` after the response has been handed to the socket; it must be quick
  (enqueue, count), as it runs before the connection's next request.

Order: higher `priority` first, then config order (global, service, route). A route's entry
replaces the service's and the global entry of the same name, like Kong's plugin precedence.
Chains are compiled once per route (see `tollgate.runtime.runtime`), so the request path only
iterates over tuples of bound methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from tollgate.config.base import Model

if TYPE_CHECKING:
    from tollgate.runtime.context import CompileContext

PHASES = ("access", "upstream_response", "body", "log")


class Policy:
    """Base class of policies. Subclasses set `name`, `priority`, `Config`."""

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    Config: ClassVar[type[Model]]

    def __init__(self, config: Any, context: CompileContext) -> None:
        self.config = config

    def phases(self) -> tuple[str, ...]:
        """The phases this policy acts in: the phase methods its class defines."""
        return tuple(p for p in PHASES if getattr(type(self), p, None) is not None)

    def handler(self, phase: str) -> Callable[..., Any]:
        """What a route calls for `phase`: the phase method itself, unless a policy hands out
        a compiled object's method instead (no interpreted call on the request path)."""
        handler: Callable[..., Any] = getattr(self, phase)
        return handler

    def __repr__(self) -> str:
        return f"{type(self).__name__}(priority={self.priority}, config={self.config!r})"


_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator: make a policy available by its `name` in config."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"policy {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[Policy]]:
    """Every registered policy by name (a copy)."""
    return dict(_REGISTRY)
