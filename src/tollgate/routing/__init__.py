"""Route matching: which route serves a request. See `tollgate.routing.router`."""

from tollgate.routing.router import NO_PARAMS, RouteMatch, Router, RouterError, RouteSpec

__all__ = ["NO_PARAMS", "RouteMatch", "RouteSpec", "Router", "RouterError"]
