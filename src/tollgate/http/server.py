"""The client-facing HTTP/1.1 listener and proxy, on `asyncio.Protocol` + `httptools`.

No framework sits here (see the measurements in tollgate.http.upstream): each connection parses
with llhttp, routes, runs the route's access chain and streams the exchange to a pooled
upstream connection, all from parser callbacks; a task is created only to open a new upstream
connection or for an asynchronous policy. Writes to the client are collected while one read is
parsed and sent in one call.

What this module guarantees, and the conformance tests pin:
- keep-alive, pipelined requests answered in order, `Connection: close` honoured;
- bodies streamed both ways, with flow control (pause reading one side when the other side's
  write buffer passes its high-water mark);
- `Expect: 100-continue` answered by the gateway once the request is admitted;
- request smuggling refused: Content-Length with Transfer-Encoding, duplicate or invalid
  Content-Length, any Transfer-Encoding but `chunked`, obsolete line folding, bare CR or LF,
  invalid chunk sizes: 400 and the connection closed;
- limits: request line (414), header block and header count (431), body (413), header and body
  read timeouts (408), idle keep-alive timeout (silent close);
- `Upgrade` (WebSocket) tunnelled after the upstream's 101.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import httptools

from tollgate.errors import UpstreamError
from tollgate.http.exchange import Exchange
from tollgate.http.headers import (
    IDEMPOTENT_METHODS,
    PLAIN_CONNECTION_TOKENS,
    PLAIN_CONNECTION_VALUES,
    RESPONSE_DROP,
    connection_tokens,
)
from tollgate.http.ids import REQUEST_IDS, acceptable_incoming_id
from tollgate.http.paths import InvalidPath, normalize_path
from tollgate.http.responses import GatewayResponse, error_response
from tollgate.http.upstream import UpstreamConnection

if TYPE_CHECKING:
    from tollgate.config.schema import ListenerLimits
    from tollgate.observe.metrics import WorkerMetrics
    from tollgate.observe.recorder import CallRecorder
    from tollgate.observe.redaction import CapturePolicy
    from tollgate.observe.tracing import Tracing
    from tollgate.runtime.entries import CompiledRoute, TargetEntry
    from tollgate.runtime.worker import WorkerState

_now: Final = time.monotonic

# Client write buffer marks: past HIGH the upstream side stops reading.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
# Request body bytes held while the upstream connection is being opened, before pausing.
BODY_BUFFER_HIGH: Final = 256 * 1024
# What a connection's deadline enforces (checked by the worker's sweeper): nothing; the
# request head (408); the gap between body pieces (408); idle keep-alive or lingering (close).
NO_DEADLINE: Final = 0
HEAD_DEADLINE: Final = 1
BODY_DEADLINE: Final = 2
IDLE_DEADLINE: Final = 3
# How long a connection closed with unread request bytes drains them before the final close.
LINGER_TIMEOUT: Final = 2.0
# Pipelined requests queued behind the one in flight before the connection stops reading.
PIPELINE_DEPTH: Final = 16
# After the gateway answered early (e.g. 401), unread request body it will read and drop to keep
# the connection; past this it closes instead.
DISCARD_LIMIT: Final = 1024 * 1024

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_VIA: Final = b"1.1 tollgate"
_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}
_METHODS: Final[dict[bytes, str]] = {}
_IDS: Final = REQUEST_IDS
_CHUNK_END: Final = b"0\r\n\r\n"


# The latency fields and Via, rendered once for the usual few milliseconds of each side.
_LATENCY_FORMAT: Final = (
    b"X-Tollgate-Upstream-Latency: %d\r\nX-Tollgate-Latency: %d\r\nVia: 1.1 tollgate\r\n"
)
_LATENCY_CACHED: Final = 16
_LATENCY_LINES: Final = tuple(
    _LATENCY_FORMAT % (upstream, gateway)
    for upstream in range(_LATENCY_CACHED)
    for gateway in range(_LATENCY_CACHED)
)


def _check_repeatable(lname: bytes) -> None:
    """A second copy of these headers is a smuggling vector: refuse it."""
    if lname == b"content-length":
        raise _Reject(400, "bad_request", "Duplicate Content-Length header")
    if lname == b"transfer-encoding":
        raise _Reject(400, "bad_request", "Duplicate Transfer-Encoding header")
    if lname == b"host":
        raise _Reject(400, "bad_request", "Duplicate Host header")


class _Reject(Exception):
    """Raised in a parser callback: answer with this status and close the connection."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _method(raw: bytes) -> str:
    method = _METHODS.get(raw)
    if method is None:
        method = raw.decode("ascii")
        if len(_METHODS) < 64:
            _METHODS[raw] = method
    return method


def _status_line(status: int, reason: bytes) -> bytes:
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if len(_STATUS_LINES) < 256:
        _STATUS_LINES[(status, reason)] = line
    return line


# What the listener does with a response header, by its name as sent. Upstreams send few
# distinct spellings, so a bounded cache of the raw names saves a lower() and a set lookup per
# header.
FORWARD: Final = 0
DROP: Final = 1  # hop-by-hop
CONTENT_LENGTH: Final = 2
CONNECTION: Final = 3
UPGRADE: Final = 4
REQUEST_ID: Final = 5
_RESPONSE_KINDS: Final[dict[bytes, int]] = {}


def _response_kind(name: bytes) -> int:
    lname = name.lower()
    if lname == b"content-length":
        kind = CONTENT_LENGTH
    elif lname == b"connection":
        kind = CONNECTION
    elif lname == b"upgrade":
        kind = UPGRADE
    elif lname == b"x-request-id":
        kind = REQUEST_ID
    elif lname in RESPONSE_DROP:
        kind = DROP
    else:
        kind = FORWARD
    if len(_RESPONSE_KINDS) < 1024:
        _RESPONSE_KINDS[name] = kind
    return kind


def _without_listed(parts: list[bytes], listed: frozenset[bytes]) -> list[bytes]:
    """Drop the headers a `Connection` header named (parts hold name, ': ', value, CRLF)."""
    kept = parts[:1]
    for index in range(1, len(parts), 4):
        if parts[index].lower() not in listed:
            kept += parts[index : index + 4]
    return kept


class Limits:
    """The listener limits as plain attributes: read several times per request."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.max_request_line: int = limits.max_request_line
        self.max_header_size: int = limits.max_header_size
        self.max_headers: int = limits.max_headers
        self.max_body_size: int = limits.max_body_size
        self.header_timeout: float = limits.header_timeout
        self.body_timeout: float = limits.body_timeout
        self.keepalive_timeout: float = limits.keepalive_timeout
        self.keepalive_requests: int = limits.keepalive_requests

    def __repr__(self) -> str:
        return f"Limits(max_header_size={self.max_header_size}, max_body_size={self.max_body_size})"


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, proxies them, answers in order."""

    def __init__(self, state: WorkerState, scheme: bytes = b"http") -> None:
        self.state = state
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.client_ip_b = b""
        self.local_port_b = b""
        # receiving
        self.rx: Exchange | None = None
        self.reading = False  # inside data_received: upstream writes wait in up_out
        self.up_out: list[bytes] = []
        self.rx_headers: list[tuple[bytes, bytes, bytes]] = []
        self.rx_map: dict[bytes, bytes] = {}
        self.runtime = state.runtime
        self.limits = Limits(state.runtime.limits)
        # Where every exchange's call record goes; None when `logs.enabled` is false.
        self.recorder: CallRecorder | None = state.recorder
        # Traces of calls (tollgate.observe.tracing); None when `tracing.enabled` is false.
        self.tracing: Tracing | None = state.tracing
        self.metrics: WorkerMetrics = state.metrics
        self.host_raw = b""  # the last Host header and its parsed name: clients repeat it
        self.host = ""
        # The forwarding lines last sent upstream, reused while target and Host stay the same.
        self.forward_target: TargetEntry | None = None
        self.forward_host = b""
        self.forward_block = b""
        self.in_head = False
        self.head_bytes = 0  # bytes of the reads that began inside the current head
        self.read_size = 0  # bytes of the read being parsed
        self.head_first_read = 0  # bytes of the read the current head began in
        self.url = b""
        # responding
        self.cur: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.up: UpstreamConnection | None = None
        self.target: TargetEntry | None = None
        self.target_index = -1
        self.out: list[bytes] = []
        self.resp_chunked = False
        self.close_after = False
        self.tunnel = False
        self.tunnel_pending: bytes = b""
        # housekeeping
        self.deadline = 0.0
        self.deadline_kind = NO_DEADLINE
        self.closing = False
        self.closed = False
        self.linger = False  # close by half-closing and draining (unread request bytes)
        self.lingering = False
        self.requests = 0
        self.paused_upstream = False
        self.paused_buffer = False
        self.paused_pipeline = False
        self.reading_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = peer[0]
        elif peer:
            self.client_ip = str(peer)
        self.client_ip_b = self.client_ip.encode()
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.local_port_b = str(local[1]).encode()
        self.state.connections.add(self)
        self.deadline = _now() + self.limits.header_timeout
        self.deadline_kind = IDLE_DEADLINE
        if self.state.draining:
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.forget(self)
        up = self.up
        if up is not None:
            self.up = None
            up.abandon()
            self._balancer_finished(None)
        ex = self.cur
        now = _now()
        if ex is not None and not ex.t_end:
            self._cut_short(ex, now)
            self._log(ex)
            self._record(ex)
        self.cur = None
        # Requests read but not yet answered end here too, each with a record of its own.
        for queued in self.pipeline:
            if queued is not ex:
                self._cut_short(queued, now)
                self._record(queued)
        self.pipeline.clear()

    def _cut_short(self, ex: Exchange, now: float) -> None:
        """End an exchange the connection's end interrupted."""
        ex.t_end = now
        if self.tunnel and ex is self.cur:
            return  # a tunnel ends when either side closes: its 101 stands
        if not ex.error_type:
            ex.status = 499  # the client went away first (nginx's convention)
            ex.error_type = "client_disconnected"
        # Otherwise the gateway cut it off (a timeout, a protocol error, a shutdown): the
        # error type says why, the status is what the client was sent, 0 if nothing.

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # after the final answer: read and drop until the client closes
        if self.tunnel:
            if self.up is not None:
                self.up.write(data)
            else:
                self.tunnel_pending += data
            return
        size = self.read_size = len(data)
        if self.in_head:
            self.head_bytes += size
        self.reading = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tunnel_pending = data[upgrade.args[0] :]
            self._pause_for_upgrade()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._protocol_error(cause.status, cause.error_type, cause.message)
            else:
                # A bug of ours (or of a policy), not of the client: 500, and it is logged.
                self._protocol_error(500, "internal_error", "The gateway failed on this request")
                self.state.log_exception("error in a parser callback", cause)
        except httptools.HttpParserError as exc:
            self._protocol_error(400, "bad_request", _parser_message(exc))
        else:
            if self.in_head and self.head_bytes > self.limits.max_header_size:
                self._protocol_error(
                    431, "request_header_too_large", "The request header block is too large"
                )
        self.reading = False
        if self.up_out:
            self._flush_upstream()
        if self.out:
            self._flush()

    def _to_upstream(self, data: bytes) -> None:
        """Bytes for the upstream; while a read is parsed they are sent together at its end."""
        if self.reading:
            self.up_out.append(data)
        elif self.up is not None:
            self.up.write(data)

    def _flush_upstream(self) -> None:
        up_out = self.up_out
        if self.up is not None:
            self.up.write(up_out[0] if len(up_out) == 1 else b"".join(up_out))
        up_out.clear()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def eof_received(self) -> bool | None:
        # A half-closed client may still read the answer to what it sent, but not when it
        # stopped in the middle of a request: that request can never be complete, so the
        # client is gone (its exchanges end as 499, client_disconnected).
        return True if self.cur is not None and self.rx is None else None

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        ex = Exchange()
        ex.t_start = now = _now()
        ex.client_ip = self.client_ip
        self.rx = ex
        self.rx_headers = ex.headers
        self.rx_map = ex.header_map
        self.in_head = True
        self.url = b""
        self.head_first_read = self.read_size
        runtime = self.state.runtime
        if runtime is not self.runtime:  # a reload: new requests see the new limits
            self.runtime = runtime
            self.limits = Limits(runtime.limits)
        limits = self.limits
        if self.deadline_kind != BODY_DEADLINE:
            self.deadline = now + limits.header_timeout
            self.deadline_kind = HEAD_DEADLINE

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            raise _Reject(414, "uri_too_long", "The request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        headers = self.rx_headers
        headers.append((lname, name, value))
        header_map = self.rx_map
        if lname in header_map:
            _check_repeatable(lname)
        else:
            header_map[lname] = value
        if len(headers) > self.limits.max_headers:
            raise _Reject(431, "request_header_too_large", "Too many request headers")

    def on_headers_complete(self) -> None:
        ex = self.rx
        assert ex is not None
        self.in_head = False
        # data_received sees only heads still unfinished after a read; a head that ended within
        # these reads is measured exactly, but only when the reads could hold a too-large one.
        limit = self.limits.max_header_size
        if self.head_first_read + self.head_bytes > limit and _head_size(self.url, ex) > limit:
            raise _Reject(431, "request_header_too_large", "The request header block is too large")
        self.head_bytes = 0
        parser = self.parser
        ex.method_raw = raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        ex.method = method if method is not None else _method(raw_method)
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        header_map = ex.header_map
        # HTTP/1.1 is assumed unless keep-alive is off or the client spoke of it explicitly.
        if (not keep_alive or b"connection" in header_map) and parser.get_http_version() == "1.0":
            ex.version = b"1.0"
        # Target: origin-form, or absolute-form from a client that thinks we are a proxy.
        url = self.url
        if url[:1] != b"/":
            url = self._absolute_form(ex, url)
        # `find`, not `in`: `bytes in bytes` first tries the operand as an int, and pays for
        # the TypeError it formats (about 0.2 µs a test).
        if url.find(b"?") >= 0:
            path_bytes, _, ex.query = url.partition(b"?")
        else:
            path_bytes = url
        if path_bytes.find(b"#") >= 0:
            raise _Reject(400, "bad_request", "A fragment is not allowed in the request target")
        path = path_bytes.decode("latin-1")
        if "%" in path or "/." in path or "//" in path:
            try:
                path = normalize_path(path)
            except InvalidPath as exc:
                raise _Reject(400, "bad_request", str(exc)) from None
            path_bytes = path.encode("latin-1")
        ex.path = path
        ex.raw_path = path_bytes
        host = header_map.get(b"host")
        if host is None:
            if ex.version != b"1.0":
                raise _Reject(400, "bad_request", "A Host header is required")
        elif host == self.host_raw:
            ex.host = self.host
        else:
            self.host_raw = host
            ex.host = self.host = _host_name(host)
        if parser.should_upgrade():
            ex.upgrade = True
        incoming_id = header_map.get(b"x-request-id")
        if incoming_id is not None and acceptable_incoming_id(incoming_id):
            ex.request_id = incoming_id.decode("ascii")
        else:
            ex.request_id = _IDS.next()
        if (
            b"content-length" in header_map
            or b"transfer-encoding" in header_map
            or b"expect" in header_map
        ):
            self._body_framing(ex, header_map)
        else:
            self.deadline = 0.0
            self.deadline_kind = NO_DEADLINE
        if self.cur is None:
            self.cur = ex
            self._start(ex)
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) >= PIPELINE_DEPTH:
                self.paused_pipeline = True
                self._update_reading()

    def _body_framing(self, ex: Exchange, header_map: dict[bytes, bytes]) -> None:
        """Exactly one of Content-Length or a lone `chunked` frames a body (RFC 9112 §6.3)."""
        transfer_encoding = header_map.get(b"transfer-encoding")
        if transfer_encoding is not None:
            if b"content-length" in header_map:
                raise _Reject(400, "bad_request", "Both Content-Length and Transfer-Encoding")
            if transfer_encoding.strip().lower() != b"chunked":
                raise _Reject(400, "bad_request", "Unsupported Transfer-Encoding")
            ex.request_chunked = True
        expect = header_map.get(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise _Reject(417, "expectation_failed", "Only 100-continue is supported")
            ex.expect_continue = True
        if ex.request_chunked or b"content-length" in header_map:
            self.deadline = ex.t_start + self.limits.body_timeout
            self.deadline_kind = BODY_DEADLINE
        else:
            self.deadline = 0.0
            self.deadline_kind = NO_DEADLINE

    def on_body(self, body: bytes) -> None:
        ex = self.rx
        assert ex is not None
        size = len(body)
        ex.body_bytes += size
        if ex.capture_in is not None:
            _keep(ex.capture_in, body, ex.capture_limit)
        if self.deadline_kind == BODY_DEADLINE:
            self.deadline = _now() + self.limits.body_timeout
        if ex.discard:
            if ex.body_bytes > DISCARD_LIMIT:
                self.closing = True
                self._close_now()
            return
        route = ex.route
        limit = route.max_body_size if route is not None else self.limits.max_body_size
        if limit and ex.body_bytes > limit:
            raise _Reject(
                413, "request_body_too_large", f"Request body is larger than {limit} bytes"
            )
        if self.up is not None and ex is self.cur and ex.body_buffer is None:
            if ex.request_chunked:
                self._to_upstream(b"%x\r\n%b\r\n" % (size, body))
            else:
                self._to_upstream(body)
            return
        if ex.body_buffer is None:
            ex.body_buffer = [body]
        else:
            ex.body_buffer.append(body)
        ex.buffered += size
        if ex.buffered > BODY_BUFFER_HIGH and not self.paused_buffer:
            self.paused_buffer = True
            self._update_reading()

    def on_message_complete(self) -> None:
        ex = self.rx
        assert ex is not None
        self.rx = None
        ex.request_complete = True
        if self.deadline_kind == BODY_DEADLINE:
            self.deadline = 0.0
            self.deadline_kind = NO_DEADLINE
        if ex.discard:
            ex.discard = False
            return
        up = self.up
        if ex is self.cur and up is not None and ex.body_buffer is None:
            if ex.request_chunked:
                self._to_upstream(_CHUNK_END)
            up.request_pending = False

    # -- request path ----------------------------------------------------------------------

    def _absolute_form(self, ex: Exchange, url: bytes) -> bytes:
        if url == b"*" and ex.method == "OPTIONS":
            return b"/"
        scheme, sep, rest = url.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise _Reject(400, "bad_request", "Invalid request target")
        authority, slash, path = rest.partition(b"/")
        if not authority:
            raise _Reject(400, "bad_request", "Invalid request target")
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
        ex.header_map[b"host"] = authority
        return b"/" + path if slash else b"/"

    def _start(self, ex: Exchange) -> None:
        """Route the current exchange and run its access chain; proxy it if admitted."""
        tracing = self.tracing
        if tracing is not None:
            tracing.begin(ex)
        if ex.preset_response is not None:
            self._respond(ex, ex.preset_response)
            return
        runtime = self.runtime
        found = runtime.router.match(ex.method, ex.host, ex.path, ex.header_map)
        if found.__class__ is int:
            self._no_route(ex, found)
            return
        route: CompiledRoute = found.payload  # type: ignore[union-attr]
        ex.params = found.params  # type: ignore[union-attr]
        self._admit(ex, route, found.path)  # type: ignore[union-attr]

    def _admit(self, ex: Exchange, route: CompiledRoute, path: str) -> None:
        ex.route = route
        if route.capture is not None:
            _start_capture(ex, route.capture)
        upstream_path = ex.raw_path if path == ex.path else path.encode("latin-1")
        ex.upstream_path = (
            route.service_path + upstream_path if route.service_path else upstream_path
        )
        declared = ex.header_map.get(b"content-length")
        if declared is not None and route.max_body_size and int(declared) > route.max_body_size:
            self._respond(
                ex,
                error_response(
                    413,
                    "request_body_too_large",
                    f"Request body is larger than {route.max_body_size} bytes",
                    ex.request_id,
                ),
            )
            return
        self._run_access(ex, route, 0)

    def _run_access(self, ex: Exchange, route: CompiledRoute, start: int) -> None:
        """The access chain from step `start`: proxy if every step admits the request.

        A step answers None (go on), a response (sent), or something to wait for: a Future
        (a store's round trip) resumes the chain from its done callback, with no task made;
        any other awaitable (a coroutine) runs in a task of its own."""
        access = route.access
        count = len(access)
        index = start
        while index < count:
            result = access[index](ex)
            index += 1
            if result is not None:
                if result.__class__ is GatewayResponse:
                    self._respond(ex, result)
                elif isinstance(result, asyncio.Future):
                    result.add_done_callback(partial(self._access_resumed, ex, route, index))
                else:
                    self._spawn(self._access_async(ex, route, result, index))
                return
        self._proxy(ex, route, ())

    def _access_resumed(
        self, ex: Exchange, route: CompiledRoute, next_index: int, future: asyncio.Future[Any]
    ) -> None:
        """An access step's Future is done: answer its response, or go on with the chain."""
        if self.closed or ex is not self.cur:
            if not future.cancelled():
                future.exception()  # the client has gone: nothing to answer, nothing to log
            return
        try:
            result = future.result()
            if result is not None:
                self._respond(ex, result)
            else:
                self._run_access(ex, route, next_index)
        except (Exception, asyncio.CancelledError) as exc:  # cancelled: it cannot go on
            self._access_failed(ex, exc)
            return
        self._flush()

    async def _access_async(
        self, ex: Exchange, route: CompiledRoute, pending: Any, next_index: int
    ) -> None:
        """The rest of an access chain after a policy needed I/O."""
        try:
            await self._access_rest(ex, route, pending, next_index)
        except Exception as exc:
            self._access_failed(ex, exc)

    def _access_failed(self, ex: Exchange, exc: BaseException) -> None:
        """A policy failed after its step began waiting: 500, and the connection closes."""
        self.state.log_exception("error in an access policy", exc)
        if not self.closed and ex is self.cur and not ex.response_started:
            response = error_response(
                500, "internal_error", "The gateway failed on this request", ex.request_id
            )
            response.close = True
            self._respond(ex, response)
            self._flush()

    async def _access_rest(
        self, ex: Exchange, route: CompiledRoute, pending: Any, next_index: int
    ) -> None:
        result = await pending
        access = route.access
        index = next_index
        while True:
            if self.closed or ex is not self.cur:
                return
            if result is not None:
                self._respond(ex, result)
                self._flush()
                return
            if index >= len(access):
                break
            result = access[index](ex)
            index += 1
            if result is not None and result.__class__ is not GatewayResponse:
                result = await result
        self._proxy(ex, route, ())
        self._flush()

    def _no_route(self, ex: Exchange, status: int) -> None:
        router = self.runtime.router
        if status == 405:
            # A CORS preflight is matched as the request it announces.
            requested = ex.header_map.get(b"access-control-request-method")
            if ex.method == "OPTIONS" and requested is not None:
                found = router.match(_method(requested.strip()), ex.host, ex.path, ex.header_map)
                if found.__class__ is not int:
                    route: CompiledRoute = found.payload  # type: ignore[union-attr]
                    if any(p.name == "cors" for p in route.policies):
                        ex.params = found.params  # type: ignore[union-attr]
                        self._admit(ex, route, found.path)  # type: ignore[union-attr]
                        return
            allowed = ", ".join(sorted(router.allowed_methods(ex.host, ex.path, ex.header_map)))
            self._respond(
                ex,
                error_response(
                    405,
                    "method_not_allowed",
                    f"Method {ex.method} is not allowed on this route",
                    ex.request_id,
                    [(b"Allow", allowed.encode())],
                ),
            )
            return
        self._respond(
            ex, error_response(404, "not_found", "No route matches the request", ex.request_id)
        )

    def _proxy(self, ex: Exchange, route: CompiledRoute, exclude: tuple[int, ...]) -> None:
        group = route.upstream
        key = self._hash_key(ex, group.hash_on) if group.needs_key else None
        index = group.balancer.pick(key, exclude)
        if index is None:
            self._respond(
                ex,
                error_response(
                    503, "no_upstream_available", "No upstream target is available", ex.request_id
                ),
            )
            return
        target = group.targets[index]
        self.target = target
        self.target_index = index
        ex.tries += 1
        ex.upstream_target = target.url
        group.balancer.started(index)
        conn = target.pool.acquire_idle() if not ex.upgrade else None
        ex.t_upstream_start = now = _now()
        tracing = self.tracing
        if tracing is not None:
            tracing.attempt(ex, target)
        if conn is not None:
            ex.t_connected = now
            self._send(ex, route, target, conn)
        else:
            self._spawn(self._connect(ex, route, target, index, exclude))

    def _hash_key(self, ex: Exchange, hash_on: str) -> bytes | None:
        kind, _, name = hash_on.partition(":")
        if kind == "ip":
            return self.client_ip_b
        if kind == "consumer":
            return ex.consumer.id.encode() if ex.consumer is not None else self.client_ip_b
        if kind == "header":
            return ex.header_map.get(name.lower().encode())
        cookies = ex.header_map.get(b"cookie")
        if cookies:
            wanted = name.encode() + b"="
            for part in cookies.split(b";"):
                part = part.strip()
                if part.startswith(wanted):
                    return part[len(wanted) :]
        return None

    async def _connect(
        self,
        ex: Exchange,
        route: CompiledRoute,
        target: TargetEntry,
        index: int,
        exclude: tuple[int, ...],
    ) -> None:
        try:
            conn = await target.pool.connect()
        except UpstreamError as error:
            self._balancer_finished(None)
            if self.closed or ex is not self.cur:
                return
            group = route.upstream
            # Every error here is a failure to connect (refused, unreachable, timed out): the
            # request never left, so an idempotent one may go to another target.
            retry = (
                ex.method in IDEMPOTENT_METHODS
                and ex.tries <= group.retries
                and len(group.targets) > len(exclude) + 1
            )
            if retry:
                if self.tracing is not None:
                    self.tracing.attempt_failed(ex, error.error_type)
                self._proxy(ex, route, (*exclude, index))
            else:
                self._upstream_error(ex, error)
            self._flush()
            return
        if self.closed or ex is not self.cur:
            conn.close()
            return
        ex.t_connected = _now()
        self._send(ex, route, target, conn)
        self._flush()

    def _send(
        self, ex: Exchange, route: CompiledRoute, target: TargetEntry, conn: UpstreamConnection
    ) -> None:
        self.up = conn
        head = self._request_head(ex, route, target)
        buffered = ex.body_buffer
        if buffered is not None:
            ex.body_buffer = None
            ex.buffered = 0
            if ex.request_chunked:
                pieces = [head]
                for chunk in buffered:
                    pieces.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if ex.request_complete:
                    pieces.append(_CHUNK_END)
                data = b"".join(pieces)
            else:
                data = head + b"".join(buffered)
            if self.paused_buffer:
                self.paused_buffer = False
                self._update_reading()
        elif ex.request_chunked and ex.request_complete:
            data = head + _CHUNK_END
        else:
            data = head
        conn.start(self, ex.method == "HEAD")
        if not ex.request_complete:
            conn.request_pending = True  # cleared once the last body byte is forwarded
        self._to_upstream(data)
        if ex.expect_continue and not ex.request_complete:
            self.out.append(_CONTINUE)

    def _request_head(self, ex: Exchange, route: CompiledRoute, target: TargetEntry) -> bytes:
        header_map = ex.header_map
        parts: list[bytes] = [ex.method_raw, b" ", ex.upstream_path]
        if ex.query:
            parts.append(b"?")
            parts.append(ex.query)
        parts.append(b" HTTP/1.1\r\n")
        drop = route.drop_request_headers
        removed: frozenset[bytes] | set[bytes] | None = ex.upstream_remove
        connection = header_map.get(b"connection")
        if connection is not None and connection.lower() not in PLAIN_CONNECTION_VALUES:
            listed = connection_tokens(connection) - PLAIN_CONNECTION_TOKENS
            if listed:
                removed = listed if removed is None else removed | listed
        for lname, name, value in ex.headers:
            if lname in drop or (removed is not None and lname in removed):
                continue
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        client_host = header_map.get(b"host", b"")
        forwarded_for = header_map.get(b"x-forwarded-for")
        via = header_map.get(b"via")
        if forwarded_for is None and via is None and not route.preserve_host:
            # The usual case: the same block for every request of this connection and target.
            if target is not self.forward_target or client_host != self.forward_host:
                self.forward_target = target
                self.forward_host = client_host
                self.forward_block = self._forward_block(
                    target.host_header, client_host, None, None
                )
            parts.append(self.forward_block)
        else:
            host = client_host if route.preserve_host and client_host else target.host_header
            parts.append(self._forward_block(host, client_host, forwarded_for, via))
        parts.append(route.request_id_header)
        parts.append(b": ")
        parts.append(ex.request_id.encode())
        parts.append(b"\r\n")
        trace = ex.trace
        if trace is not None:
            parts.append(trace.header)
        for name, value in ex.upstream_headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if ex.request_chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            length = header_map.get(b"content-length")
            if length is not None:
                parts.append(b"Content-Length: ")
                parts.append(length.strip())
                parts.append(b"\r\n")
        if ex.upgrade:
            parts.append(b"Connection: upgrade\r\nUpgrade: ")
            parts.append(header_map.get(b"upgrade", b""))
            parts.append(b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _forward_block(
        self, host: bytes, client_host: bytes, forwarded_for: bytes | None, via: bytes | None
    ) -> bytes:
        """Host, X-Forwarded-For/-Proto/-Host and Via lines for the upstream request."""
        return b"".join(
            (
                b"Host: ",
                host,
                b"\r\nX-Forwarded-For: ",
                forwarded_for + b", " + self.client_ip_b if forwarded_for else self.client_ip_b,
                b"\r\nX-Forwarded-Proto: ",
                self.scheme,
                b"\r\nX-Forwarded-Host: ",
                client_host,
                b"\r\nX-Forwarded-Port: ",
                self.local_port_b,
                b"\r\nVia: ",
                via + b", " + _VIA if via else _VIA,
                b"\r\n",
            )
        )

    # -- upstream events (Sink) -----------------------------------------------------------

    def upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.cur
        assert ex is not None
        now = ex.t_first_byte = _now()
        ex.status = status
        ex.source = "upstream"
        ex.response_started = True
        route = ex.route
        assert route is not None
        for step in route.upstream_response:
            step(ex, status, headers)
        if route.capture is not None:
            ex.captured_response_headers = headers
        line = _STATUS_LINES.get((status, reason))
        parts: list[bytes] = [line if line is not None else _status_line(status, reason)]
        has_length = False
        listed = None
        kinds = _RESPONSE_KINDS
        echo_id = route.echo_request_id
        custom_id = route.custom_request_id
        # Body-phase policies may change the length: the client then gets the body chunked.
        rewrites_body = bool(route.body)
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                kind = _response_kind(name)
            if custom_id and kind in (FORWARD, REQUEST_ID):
                # A renamed id header: the upstream's copy of it is the one replaced.
                kind = REQUEST_ID if name.lower() == custom_id else FORWARD
            if (
                kind == FORWARD
                or (kind == REQUEST_ID and not echo_id)
                or (kind == UPGRADE and status == 101)
            ):
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
            elif kind == CONTENT_LENGTH and not rewrites_body:
                has_length = True
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
            elif kind == CONNECTION and value.lower() not in PLAIN_CONNECTION_VALUES:
                listed = connection_tokens(value) - PLAIN_CONNECTION_TOKENS
        if listed:
            parts = _without_listed(parts, listed)
        if status == 101:
            parts.append(b"Connection: upgrade\r\n")
            self.tunnel = True
        elif not has_length and status not in (204, 304) and ex.method != "HEAD":
            if ex.version == b"1.1":
                self.resp_chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_after = True
        if echo_id:
            # The gateway's id replaces an upstream's own X-Request-Id (kind 5, dropped above).
            parts.append(route.request_id_header)
            parts.append(b": ")
            parts.append(ex.request_id.encode())
            parts.append(b"\r\n")
        if ex.response_headers:
            for name, value in ex.response_headers:
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
        if ex.response_block:
            parts.append(ex.response_block)
        upstream_ms = int((now - ex.t_upstream_start) * 1000)
        gateway_ms = int((now - ex.t_start) * 1000) - upstream_ms
        if gateway_ms < 0:
            gateway_ms = 0
        if 0 <= upstream_ms < _LATENCY_CACHED and gateway_ms < _LATENCY_CACHED:
            parts.append(_LATENCY_LINES[upstream_ms * _LATENCY_CACHED + gateway_ms])
        else:
            parts.append(_LATENCY_FORMAT % (upstream_ms, gateway_ms))
        if status != 101 and not self._client_keep_alive(ex):
            parts.append(b"Connection: close\r\n\r\n")
        elif ex.version == b"1.0" and status != 101:
            # An HTTP/1.0 client takes the connection as closing unless told it persists.
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.out.append(b"".join(parts))
        if status == 101:
            self._flush()
            pending = self.tunnel_pending
            self.tunnel_pending = b""
            if pending and self.up is not None:
                self.up.write(pending)
            if self.transport is not None:
                self.transport.resume_reading()

    def upstream_body(self, chunk: bytes) -> None:
        ex = self.cur
        assert ex is not None
        route = ex.route
        if route is not None and route.body:
            for step in route.body:
                chunk = step(ex, chunk)
            if not chunk:
                return  # held back by a policy; an empty chunk would end a chunked body
        ex.bytes_out += len(chunk)
        if ex.capture_out is not None:
            _keep(ex.capture_out, chunk, ex.capture_limit)
        if self.resp_chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.out.append(chunk)

    def upstream_flush(self) -> None:
        if self.out:
            self._flush()

    def upstream_tunnel_data(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def upstream_done(self, reusable: bool) -> None:
        ex = self.cur
        self.up = None
        if ex is None:
            return
        if self.tunnel:
            self._finish(ex, False)
            return
        route = ex.route
        if route is not None and route.body:
            self._end_body(ex, route)
        if self.resp_chunked:
            self.out.append(_CHUNK_END)
        self._balancer_finished(ex)
        self._finish(ex, self._client_keep_alive(ex))

    def _end_body(self, ex: Exchange, route: CompiledRoute) -> None:
        """Body-phase policies get a last call with b"" and may return what they held back."""
        if ex.method == "HEAD" or ex.status in (204, 304):
            return
        for index, step in enumerate(route.body):
            tail = step(ex, b"")
            for later in route.body[index + 1 :]:
                if tail:
                    tail = later(ex, tail)
            if tail:
                ex.bytes_out += len(tail)
                if ex.capture_out is not None:
                    _keep(ex.capture_out, tail, ex.capture_limit)
                self.out.append(b"%x\r\n%b\r\n" % (len(tail), tail) if self.resp_chunked else tail)

    def upstream_failed(self, error: UpstreamError, response_started: bool) -> None:
        ex = self.cur
        conn = self.up
        self.up = None
        self._balancer_finished(None)
        if ex is None:
            return
        if response_started:
            # Part of the response is out: the client can only learn of it by the connection's end.
            ex.error_type = error.error_type
            self._finish(ex, False)
            self._flush()
            return
        route = ex.route
        if (
            route is not None
            and ex.method in IDEMPOTENT_METHODS
            and ex.body_bytes == 0
            and ex.tries <= route.upstream.retries
            and not self.closed
            and conn is not None
            and conn.reused
            and error.error_type == "upstream_protocol_error"
        ):
            # A reused keep-alive connection closed by the upstream as we wrote: try a fresh one.
            if self.tracing is not None:
                self.tracing.attempt_failed(ex, error.error_type)
            self._proxy(ex, route, ())
            self._flush()
            return
        self._upstream_error(ex, error)
        self._flush()

    def upstream_pause(self) -> None:
        self.paused_upstream = True
        self._update_reading()

    def upstream_resume(self) -> None:
        self.paused_upstream = False
        self._update_reading()

    # -- answering and finishing ----------------------------------------------------------

    def _upstream_error(self, ex: Exchange, error: UpstreamError) -> None:
        self._respond(
            ex, error_response(error.status, error.error_type, error.message, ex.request_id)
        )

    def _respond(self, ex: Exchange, response: GatewayResponse) -> None:
        """Send a gateway-made response for the current exchange."""
        ex.status = response.status
        ex.source = "gateway"
        ex.error_type = response.error_type or ""
        ex.response_started = True
        keep_alive = self._client_keep_alive(ex) and not response.close
        if not ex.request_complete:
            # Answered: the rest of the body is dropped as it comes, never answered again (a
            # closing answer too, or a body past the limit would get a second response).
            ex.discard = True
            if ex.body_buffer is not None:
                ex.body_buffer = None
                ex.buffered = 0
            if self.paused_buffer:
                self.paused_buffer = False
                self._update_reading()
            if ex.expect_continue or ex.upgrade:
                keep_alive = False  # the client may or may not send the body: do not guess
        extra: list[tuple[bytes, bytes]] = []
        route = ex.route
        if route is None or route.echo_request_id:
            name = route.request_id_header if route is not None else b"X-Request-Id"
            extra.append((name, ex.request_id.encode()))
        if ex.response_headers:
            extra.extend(ex.response_headers)
        if keep_alive and ex.version == b"1.0":
            extra.append((b"Connection", b"keep-alive"))
        head = response.head(b"1.1", extra, keep_alive, ex.method == "HEAD", ex.response_block)
        self.out.append(head)
        if response.body and ex.method != "HEAD":
            self.out.append(response.body)
            ex.bytes_out += len(response.body)
            if ex.capture_out is not None:
                _keep(ex.capture_out, response.body, ex.capture_limit)
        if route is not None and route.capture is not None:
            ex.captured_response_headers = [*response.headers, *extra]
        self._finish(ex, keep_alive)

    def _client_keep_alive(self, ex: Exchange) -> bool:
        if not ex.keep_alive or self.closing or self.close_after or self.state.draining:
            return False
        limit = self.limits.keepalive_requests
        return not (limit and self.requests + 1 >= limit)

    def _finish(self, ex: Exchange, keep_alive: bool) -> None:
        ex.t_end = now = _now()
        self.requests += 1
        self.cur = None
        self.target = None
        self.resp_chunked = False
        if ex.route is not None and ex.route.log:
            out = self.out
            if out and self.transport is not None and not self.closed:
                # The log phase runs after the answer is handed to the socket, never before.
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            self._log(ex)
        # Every exchange ends here or in connection_lost (cut short), and leaves `cur` here:
        # so each is counted and makes one record.
        self._record(ex)
        if self.tunnel and self.up is None:
            self._close_after_flush()
            return
        if not keep_alive or (not ex.request_complete and not ex.discard):
            if not ex.request_complete:
                self.linger = True
            self._close_after_flush()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if self.paused_pipeline and len(self.pipeline) < PIPELINE_DEPTH // 2:
                self.paused_pipeline = False
                self._update_reading()
            self.cur = nxt
            self._start(nxt)
        elif self.rx is None and self.deadline_kind == NO_DEADLINE:
            self.deadline = now + self.limits.keepalive_timeout
            self.deadline_kind = IDLE_DEADLINE

    def _log(self, ex: Exchange) -> None:
        route = ex.route
        if route is None:
            return
        for step in route.log:
            try:
                step(ex)
            except Exception as exc:  # a log step must never break the connection
                self.state.log_exception("error in a log phase", exc)

    def _record(self, ex: Exchange) -> None:
        """Count the finished exchange in the metrics, queue its spans and make its call record
        (a branch each when tracing or records are off); none may ever break the connection."""
        try:
            self.metrics.observe(ex)
            tracing = self.tracing
            if tracing is not None:
                tracing.finish(ex)
            recorder = self.recorder
            if recorder is not None:
                recorder.record(ex)
        except Exception as exc:
            self.state.log_exception("error counting or recording a call", exc)

    def _balancer_finished(self, ex: Exchange | None) -> None:
        target_index = self.target_index
        if target_index < 0:
            return
        self.target_index = -1
        route = ex.route if ex is not None else (self.cur.route if self.cur is not None else None)
        if route is None:
            return
        latency = (
            ex.t_first_byte - ex.t_upstream_start if ex is not None and ex.t_first_byte else None
        )
        route.upstream.balancer.finished(target_index, latency)

    def _protocol_error(self, status: int, error_type: str, message: str) -> None:
        """The request stream is broken: answer in order, then close."""
        self.parser = httptools.HttpRequestParser(self)  # never parse past a framing error
        self.in_head = False
        ex = self.rx or Exchange()
        self.rx = None
        if not ex.request_id:
            ex.request_id = _IDS.next()
        if not ex.t_start:
            ex.t_start = _now()
        ex.keep_alive = False
        ex.request_complete = True
        response = error_response(status, error_type, message, ex.request_id)
        response.close = True
        self.linger = True  # the client may still be sending: drain before closing
        if self.transport is not None:
            self.transport.pause_reading()
        if ex is self.cur:
            self.closing = True
            if ex.response_started:
                ex.error_type = error_type  # recorded when the connection is gone
                self._close_now()
                return
            up = self.up
            if up is not None:
                self.up = None
                up.abandon()
                self._balancer_finished(None)
            self._respond(ex, response)
        elif self.cur is None:
            self.closing = True
            self.cur = ex
            self._respond(ex, response)
        else:
            # Requests queued before the broken one are answered first, then the error, then
            # the connection closes (its answer carries Connection: close).
            ex.preset_response = response
            if ex not in self.pipeline:
                self.pipeline.append(ex)

    def _pause_for_upgrade(self) -> None:
        # Bytes after an Upgrade request belong to the new protocol: hold them until the 101.
        if self.transport is not None:
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        paused = self.paused_upstream or self.paused_buffer or self.paused_pipeline
        if paused and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not paused and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def _flush(self) -> None:
        out = self.out
        if self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self.closing and self.cur is None and not self.tunnel:
            self._close_now()

    def _close_after_flush(self) -> None:
        self.closing = True
        if self.cur is None and not self.out:
            self._close_now()

    def _close_now(self) -> None:
        transport = self.transport
        if self.out and transport is not None and not self.closed:
            transport.write(b"".join(self.out))
            self.out.clear()
        if transport is None or self.lingering:
            return
        if self.linger and not self.closed and transport.can_write_eof():
            # Closing with unread request bytes makes the kernel send a reset, which can destroy
            # the answer before the client reads it; half-close and drain a while instead.
            self.lingering = True
            transport.write_eof()
            transport.resume_reading()
            self.deadline = _now() + LINGER_TIMEOUT
            self.deadline_kind = IDLE_DEADLINE
        else:
            transport.close()

    def _spawn(self, coro: Any) -> None:
        self.state.spawn(coro)

    # -- housekeeping called by the worker ------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Enforce the header, body and keep-alive timeouts (called by the worker's sweeper)."""
        if not self.deadline or self.deadline > now:
            return
        kind = self.deadline_kind
        self.deadline = 0.0
        self.deadline_kind = NO_DEADLINE
        if kind == IDLE_DEADLINE:
            if self.lingering:
                if self.transport is not None:
                    self.transport.close()
            else:
                self._close_now()
        elif kind == HEAD_DEADLINE:
            self._protocol_error(408, "request_timeout", "The request head took too long")
            self._flush()
        elif kind == BODY_DEADLINE:
            ex = self.rx
            if ex is not None and ex is self.cur and not ex.response_started:
                self._protocol_error(408, "request_timeout", "The request body took too long")
                self._flush()
            else:
                if ex is not None and not ex.error_type:
                    ex.error_type = "request_timeout"  # recorded when the connection is gone
                self._close_now()

    def drain(self) -> None:
        """Stop taking requests on this connection: close it if idle, else after the answer."""
        self.closing = True
        if self.cur is None and self.rx is None:
            self._close_now()

    def abort(self, reason: str) -> None:
        """Close at once; the exchanges it cuts short are recorded with `reason` as error."""
        for ex in (self.cur, *self.pipeline):
            if ex is not None and not ex.t_end and not ex.error_type:
                ex.error_type = reason
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self.cur is None and self.rx is None

    def __repr__(self) -> str:
        state = "idle" if self.idle else ("tunnel" if self.tunnel else "busy")
        return f"ClientConnection({self.client_ip}, {state}, {self.requests} requests)"


def _start_capture(ex: Exchange, capture: CapturePolicy) -> None:
    """Make room for the bodies a service's call records keep (see tollgate.observe)."""
    ex.capture_limit = capture.max_body_bytes
    if capture.request_body:
        kept = bytearray()
        if ex.body_buffer is not None:  # a pipelined request's body read before its turn
            for chunk in ex.body_buffer:
                _keep(kept, chunk, ex.capture_limit)
        ex.capture_in = kept
    if capture.response_body:
        ex.capture_out = bytearray()


def _keep(kept: bytearray, data: bytes, limit: int) -> None:
    room = limit - len(kept)
    if room > 0:
        kept += data[:room]


def _head_size(url: bytes, ex: Exchange) -> int:
    """Bytes of a parsed head: the request target and every `name: value` line."""
    return len(url) + sum(len(name) + len(value) + 4 for _, name, value in ex.headers)


def _host_name(host: bytes) -> str:
    """Lower-case host without port, from a Host header value."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return name
    return text


def _parser_message(exc: Exception) -> str:
    text = str(exc)
    if "chunk" in text.lower():
        return "Invalid chunked encoding"
    if "content-length" in text.lower():
        return "Invalid Content-Length"
    return "Malformed HTTP request"
