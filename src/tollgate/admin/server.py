"""Admin API (control plane, not the request path): health, status, reload, rate-limit counters.

Closed unless `admin.token` is set: without a token every endpoint but `/health` answers 403;
with one, requests need `Authorization: Bearer <token>` (compared in constant time).
Built on aiohttp's server: the admin API is not on the hot path, and a well-kept framework
gives it robust HTTP handling for free.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tollgate import __version__
from tollgate.errors import ConfigError, TollgateError

if TYPE_CHECKING:
    from tollgate.observe.reports import Reports
    from tollgate.runtime.supervisor import Supervisor

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SUPERVISOR = web.AppKey("supervisor", object)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _error(status: int, error_type: str, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": {"type": error_type, "message": message, **extra}}
    return web.json_response(body, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token check for everything but /health, and JSON errors for every failure."""
    if request.path != "/health":
        supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
        token = supervisor.config.admin.token
        if token is None or not token.get_secret_value():
            return _error(403, "forbidden", "The admin API is closed: set admin.token to open it")
        sent = request.headers.get("Authorization", "")
        expected = "Bearer " + token.get_secret_value()
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            return _error(401, "unauthorized", "A valid admin token is required")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


async def health(request: web.Request) -> web.Response:
    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    alive = sum(
        1 for h in supervisor.workers if h.process is not None and h.process.returncode is None
    )
    # While draining, /health fails so that a load balancer polling it stops sending traffic.
    state = "draining" if supervisor.stopping else ("ok" if alive else "down")
    return web.json_response(
        {"status": state, "workers": alive, "config_version": supervisor.version},
        status=200 if state == "ok" else 503,
    )


async def status(request: web.Request) -> web.Response:
    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    return web.json_response(
        {
            "version": __version__,
            "config_version": supervisor.version,
            "config_path": supervisor.config_path,
            "workers": [{"slot": h.slot, "pid": h.pid} for h in supervisor.workers],
            "worker_restarts": supervisor.restarts,
            "reloads": supervisor.reloads,
        }
    )


async def reload(request: web.Request) -> web.Response:
    from tollgate.runtime.supervisor import ReloadFailed

    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    try:
        version = await supervisor.reload()
    except ConfigError as exc:
        return _error(
            400,
            "config_error",
            "The new config is invalid; the previous one keeps serving",
            problems=[str(p) for p in exc.problems],
        )
    except ReloadFailed as exc:
        return _error(500, "reload_failed", str(exc))
    return web.json_response({"reloaded": True, "config_version": version})


def _rate_limit_target(request: web.Request) -> tuple[Any, str, str]:
    from tollgate.ratelimit.inspect import find_limiter

    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    policy = f"{request.match_info['service']}/{request.match_info['route']}"
    client = request.match_info["key"]
    return find_limiter(supervisor.inspector().runtime, policy), policy, client


async def rate_limit_key(request: web.Request) -> web.Response:
    """`GET /admin/rate-limits/{service}/{route}/{key}`: every limit's state for a client key."""
    from tollgate.ratelimit.inspect import read_key, store_kind

    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    try:
        limiter, policy, client = _rate_limit_target(request)
        states = await read_key(limiter, client, supervisor.inspector().clock)
    except TollgateError as exc:
        return _error(exc.status, exc.error_type, str(exc))
    return web.json_response(
        {
            "policy": policy,
            "key": client,
            "store": store_kind(limiter),
            "limits": [state.to_dict() for state in states],
        }
    )


async def reset_rate_limit_key(request: web.Request) -> web.Response:
    """`DELETE /admin/rate-limits/{service}/{route}/{key}`: forget a client key's counters."""
    from tollgate.ratelimit.inspect import reset_key

    try:
        limiter, policy, client = _rate_limit_target(request)
        count = await reset_key(limiter, client)
    except TollgateError as exc:
        return _error(exc.status, exc.error_type, str(exc))
    return web.json_response({"policy": policy, "key": client, "reset": count})


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text, summed over the node's workers."""
    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    body = await supervisor.metrics()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def analytics(request: web.Request) -> web.Response:
    """`GET /admin/analytics?start=&end=&service=&route=&consumer=&step=&latency=&top=`."""
    return await _report(request, lambda reports, query: reports.analytics(query).to_dict())


async def logs(request: web.Request) -> web.Response:
    """`GET /admin/logs?start=&end=&status=&service=&route=&consumer=&request_id=&limit=`
    (and `cursor=`, from the previous page's `next_cursor`)."""
    return await _report(request, lambda reports, query: reports.logs(query))


async def _report(
    request: web.Request, run: Callable[[Reports, dict[str, str]], Any]
) -> web.Response:
    """`run` on the supervisor's reports and the query string, off the event loop; 400 with
    the reason if the query is bad."""
    from tollgate.observe.reports import BadQuery

    supervisor: Supervisor = request.app[SUPERVISOR]  # type: ignore[assignment]
    try:
        result = await asyncio.to_thread(run, supervisor.reports(), dict(request.query))
    except BadQuery as exc:
        return _error(400, "bad_query", str(exc))
    return web.json_response(result)


async def start_admin(supervisor: Supervisor, listen: str) -> web.AppRunner:
    app = web.Application(middlewares=[_guard])
    app[SUPERVISOR] = supervisor
    app.router.add_get("/health", health)
    app.router.add_get("/admin/status", status)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/analytics", analytics)
    app.router.add_get("/admin/logs", logs)
    # The key is the rest of the path: a `path` key part may hold slashes.
    rate_limits = "/admin/rate-limits/{service}/{route}/{key:.+}"
    app.router.add_get(rate_limits, rate_limit_key)
    app.router.add_delete(rate_limits, reset_rate_limit_key)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    return runner
