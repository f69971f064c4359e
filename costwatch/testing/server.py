"""A fake Anthropic Messages API on a real socket, failing the way the real one fails in production.

The server writes the status line, headers and chunked framing itself, with plain ``sendall``
calls on the accepted socket, so a fault can cut the connection at an exact byte. One thread
serves each connection (keep-alive included), so hundreds of streams run at once.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from types import MappingProxyType, TracebackType
from typing import Any

from ..event_stream import CONTENT_TYPE as EVENT_STREAM_CONTENT_TYPE
from ..platforms import ANTHROPIC, BEDROCK, canonical_model, route_of
from ..pricing import PriceTable, load_prices
from .faults import FAULT_HEADER, DropProfile, Fault, FaultKind, FaultSchedule, ReceivedRequest
from .ledger import Ending, Ledger, LedgerEntry
from .plan import (
    TERMINAL_CHUNK,
    PlannedEvent,
    ResponsePlan,
    SentPrefix,
    StreamCut,
    bedrock_events,
    bedrock_exception_frame,
    bedrock_frame,
    chunk,
    error_body,
    error_event,
    error_message,
    malformed_event,
    non_utf8_event,
    plan_response,
    position_after_deltas,
    position_of_delta,
    sent_prefix,
    stream_cut_for,
    unknown_event,
)
from .prompt_cache import PromptCache, TooManyBreakpoints, breakpoint_prefixes
from .spec import ResponseSpec, input_tokens_for_body
from .usage_report import (
    ANALYTICS_BETA,
    COST_PATH,
    FAKE_ADMIN_KEY,
    USAGE_PATH,
    AnalyticsError,
    api_key_id_of,
    authorize,
    cost_page,
    usage_page,
)

__all__ = ["FakeAnthropicServer"]

_MESSAGES_PATH = "/v1/messages"
_COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
"""The first-party route; Foundry's ``/anthropic/v1/messages`` ends in it too."""
_PATH_MODEL = re.compile(r"/models?/([^/:]+)(?::|/invoke)")
_PRIVATE_HEADERS = frozenset({"x-api-key", "authorization"})
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
_POLL_S = 0.05


class _ClientGone(Exception):
    """The client closed the connection (or the server is stopping) while a request was read."""


@dataclasses.dataclass
class _RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class _Connection:
    """Reads HTTP/1.1 requests from one socket and writes raw bytes to it."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.buffer = b""

    def _fill(self) -> None:
        while True:
            if self.stopping.is_set():
                raise _ClientGone
            readable, _, _ = select.select([self.sock], [], [], _POLL_S)
            if readable:
                break
        data = self.sock.recv(65536)
        if not data:
            raise _ClientGone
        self.buffer += data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_request(self) -> _RawRequest:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    break
                body += self._read_exactly(size)
                self._read_exactly(2)
        else:
            body = self._read_exactly(int(headers.get("content-length", "0")))
        return _RawRequest(method, target, headers, body)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        """Close gracefully: the client reads what was sent, then EOF."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def wait_for_hangup(self, seconds: float | None) -> None:
        """Send nothing until the client closes, ``seconds`` pass, or the server stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.stopping.is_set():
            timeout = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if timeout <= 0:
                return
            try:
                readable, _, _ = select.select([self.sock], [], [], timeout)
                if readable and not self.sock.recv(65536):
                    return
            except OSError:
                return


def _api_key(raw: _RawRequest) -> str | None:
    """The key a request was sent with: ``x-api-key`` (0.x SDK) or ``Authorization: Bearer`` (2.x)."""
    key = raw.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = raw.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


# Anthropic's first-party API sends these with every response (its rate-limits documentation: the
# requests, tokens, input and output token limits of the key's tier, what is left of them and when
# they reset, plus the organization's id). Their values here are a fixed tier's; they are sent so that
# what reads a response's headers (the SDK, costwatch) reads as many as it would from the real API.
_ORGANIZATION_ID = "7c5a1b2e-0d4f-4e8a-9b6c-3f1e2d4c5b6a"
_RATE_LIMITS = {"requests": 4_000, "tokens": 2_400_000, "input-tokens": 2_000_000, "output-tokens": 400_000}


def _rate_limit_headers() -> dict[str, str]:
    """The first-party API's per-response headers of its rate limits and organization."""
    reset = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(time.time() + 60))
    headers = {"anthropic-organization-id": _ORGANIZATION_ID}
    for limit, value in _RATE_LIMITS.items():
        headers[f"anthropic-ratelimit-{limit}-limit"] = str(value)
        headers[f"anthropic-ratelimit-{limit}-remaining"] = str(value - 1)
        headers[f"anthropic-ratelimit-{limit}-reset"] = reset
    return headers


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    reason = _REASONS.get(status, "Overloaded" if status == 529 else "Error")
    lines = [f"HTTP/1.1 {status} {reason}", f"date: {email.utils.formatdate(usegmt=True)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FakeAnthropicServer:
    """An in-process fake of ``POST /v1/messages`` (and the beta route) on ``127.0.0.1``.

    Use it as a context manager or via the ``fake_anthropic`` pytest fixture, and point a real
    client at it: ``anthropic.Anthropic(base_url=server.base_url, api_key="test")``. Faults come,
    in order of precedence, from the ``x-costwatch-fault`` request header, the queue
    (:meth:`enqueue`), the ``schedule`` callable, then the random ``drop_profile``. Every attempt
    is recorded in :attr:`ledger`.
    """

    def __init__(
        self,
        spec: ResponseSpec | None = None,
        *,
        faults: Iterable[Fault | None] = (),
        schedule: FaultSchedule | None = None,
        drop_profile: DropProfile | None = None,
        spec_for: Callable[[ReceivedRequest], ResponseSpec] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        prompt_cache: PromptCache | None = None,
        admin_key: str = FAKE_ADMIN_KEY,
        usage_lag_s: float = 0.0,
        prices: PriceTable | None = None,
    ) -> None:
        self.spec = spec or ResponseSpec()
        """The answer given to every request (unless ``spec_for`` picks one)."""
        self.schedule = schedule
        self.drop_profile = drop_profile
        self.spec_for = spec_for
        self.ledger = Ledger()
        """One :class:`~costwatch.testing.ledger.LedgerEntry` per attempt received."""
        self.prompt_cache = prompt_cache or PromptCache()
        """The prefixes cached by ``cache_control`` breakpoints, billed as reads and writes."""
        self.admin_key = admin_key
        """The one key the analytics endpoints accept; any other ``sk-ant-admin`` key gets a 401,
        any other key a 403."""
        self.usage_lag_s = usage_lag_s
        """How long after an attempt the analytics endpoints start reporting it (the real data lags)."""
        self.usage_page_limit: int | None = None
        """When set, the analytics endpoints stop after this many pages while still saying there are
        more (``has_more`` true, no ``next_page``): pagination that ends early."""
        self._prices = prices
        self._host = host
        self._port = port
        self._seed = seed
        self._queue: collections.deque[Fault | None] = collections.deque(faults)
        self._count_faults: collections.deque[Fault | None] = collections.deque()
        self.token_counts: list[ReceivedRequest] = []
        self.count_tokens_delay_s = 0.0
        """How long ``count_tokens`` takes to answer (a slow count)."""
        """Every ``POST /v1/messages/count_tokens`` received, in order (they are no attempts: no ledger
        entry). Their bodies hold the texts counted: this is the fake, where tests read them."""
        self._lock = threading.Lock()
        self._attempts = 0
        self._arrivals: dict[str, int] = {}
        self._open_responses = 0
        self._peak_open_responses = 0
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> FakeAnthropicServer:
        """Bind, listen and start accepting connections; returns ``self``."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(1024)
        listener.settimeout(_POLL_S * 2)
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="fake-anthropic-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop every open connection and wait for the serving threads."""
        self._stopping.set()
        if self._listener is not None:
            # shutdown() wakes the accept thread at once; close() alone leaves it blocked in accept()
            # until the listener's timeout, a tenth of a second on every stop.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._listener = None
        self._accept_thread = None

    def __enter__(self) -> FakeAnthropicServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- public state ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (the server must be started)."""
        if self._listener is None:
            raise RuntimeError("the server is not started")
        return int(self._listener.getsockname()[1])

    @property
    def base_url(self) -> str:
        """The URL to pass as ``base_url`` to an Anthropic client."""
        return f"http://{self._host}:{self.port}"

    @property
    def peak_open_responses(self) -> int:
        """The most responses that were being written at the same time."""
        with self._lock:
            return self._peak_open_responses

    def enqueue(self, *faults: Fault | None) -> None:
        """Queue faults for the next requests, one per request, in order (``None``: no fault)."""
        with self._lock:
            self._queue.extend(faults)

    # -- serving --------------------------------------------------------------------------------------
    def enqueue_count_tokens(self, *faults: Fault | None) -> None:
        """Script the next ``count_tokens`` answers: an HTTP error, a stall (a timeout) or a reset
        each; ``None`` answers normally. Counts beyond the queue answer normally."""
        with self._lock:
            self._count_faults.extend(faults)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="fake-anthropic-conn", daemon=True
            )
            with self._lock:
                self._connections.add(sock)
                self._threads.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        connection = _Connection(sock, self._stopping)
        open_ = True
        try:
            while open_:
                raw = connection.read_request()
                open_ = self._answer(connection, raw)
        except (_ClientGone, OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                connection.close()
            with self._lock:
                self._connections.discard(sock)
                self._threads.discard(threading.current_thread())

    def _admit(self, raw: _RawRequest) -> tuple[ReceivedRequest, str]:
        path, _, query = raw.target.partition("?")
        digest = hashlib.sha256(raw.body).hexdigest()
        try:
            body: Any = json.loads(raw.body) if raw.body else None
        except ValueError:
            body = None
        with self._lock:
            self._attempts += 1
            attempt = self._attempts
            arrival = self._arrivals.get(digest, 0) + 1
            self._arrivals[digest] = arrival
        rng = random.Random(f"{self._seed}:{attempt}")
        request_id = "req_011C" + "".join(rng.choice(_BASE62) for _ in range(20))
        headers = {k: v for k, v in raw.headers.items() if k not in _PRIVATE_HEADERS}
        received = ReceivedRequest(
            method=raw.method,
            path=path,
            query=query,
            headers=MappingProxyType(headers),
            body=body,
            body_digest=digest,
            arrival=arrival,
            attempt=attempt,
        )
        return received, request_id

    def _choose_fault(self, request: ReceivedRequest) -> Fault | None:
        header = request.headers.get(FAULT_HEADER)
        if header:
            return Fault.from_header(header)
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if self.schedule is not None:
            return self.schedule(request)
        return None

    def _answer(self, connection: _Connection, raw: _RawRequest) -> bool:
        """Answer one request; returns whether the connection stays open for the next one."""
        path, _, query = raw.target.partition("?")
        if raw.method == "GET" and path in (USAGE_PATH, COST_PATH):
            # Reading the usage report is not an attempt: it has no ledger entry.
            return self._analytics(connection, raw, path, query)
        if raw.method == "POST" and path.endswith(_COUNT_TOKENS_PATH):
            return self._count_tokens(connection, raw, query)  # free, and billed nothing: no attempt
        request, request_id = self._admit(raw)
        with self._lock:
            self._open_responses += 1
            self._peak_open_responses = max(self._peak_open_responses, self._open_responses)
        try:
            api_key = _api_key(raw)
            key_id = api_key_id_of(api_key) if api_key else None
            return _Attempt(self, connection, request, request_id, raw.body, key_id).run()
        finally:
            with self._lock:
                self._open_responses -= 1

    def _count_tokens(self, connection: _Connection, raw: _RawRequest, query: str) -> bool:
        """Answer ``count_tokens`` with the tokenizer of the server's spec (:attr:`ResponseSpec.tokenizer`):
        the one the fake bills output with, so a counted text matches its billed output exactly."""
        try:
            body: Any = json.loads(raw.body) if raw.body else None
        except ValueError:
            body = None
        headers = {k: v for k, v in raw.headers.items() if k not in _PRIVATE_HEADERS}
        received = ReceivedRequest(
            method=raw.method,
            path=raw.target.partition("?")[0],
            query=query,
            headers=MappingProxyType(headers),
            body=body,
            body_digest=hashlib.sha256(raw.body).hexdigest(),
            arrival=0,
            attempt=0,
            api_key_id=api_key_id_of(key) if (key := _api_key(raw)) else None,
        )
        with self._lock:
            self.token_counts.append(received)
            fault = self._count_faults.popleft() if self._count_faults else None
        request_id = (
            "req_011C" + hashlib.sha256(raw.body + str(len(self.token_counts)).encode()).hexdigest()[:20]
        )
        extra: dict[str, str] = {}
        if self.count_tokens_delay_s > 0:
            self._stopping.wait(self.count_tokens_delay_s)
        if fault is not None and fault.kind is FaultKind.STALL_BEFORE_HEADERS:
            connection.wait_for_hangup(fault.seconds)
            return False
        if fault is not None and fault.kind is FaultKind.RESET:
            connection.reset()
            return False
        if fault is not None and fault.kind is FaultKind.HTTP_ERROR:
            status, payload = (
                fault.status,
                error_body(fault.error_type, error_message(fault.error_type), request_id),
            )
            if fault.retry_after_s is not None:
                extra["retry-after"] = str(fault.retry_after_s)
        elif received.api_key_id is None:
            status, payload = (
                401,
                error_body("authentication_error", "x-api-key header is required", request_id),
            )
        else:
            try:
                status, payload = 200, {"input_tokens": self.spec.tokenizer.count_request(body)}
            except ValueError as exc:
                status, payload = 400, error_body("invalid_request_error", str(exc), request_id)
        _send_json(connection, status, payload, request_id, extra)
        return True

    def _analytics(self, connection: _Connection, raw: _RawRequest, path: str, query: str) -> bool:
        now = datetime.now(timezone.utc)
        request_id = "req_011C" + hashlib.sha256(f"{now.timestamp()}{query}".encode()).hexdigest()[:20]
        status, payload = 200, None
        try:
            authorize(_api_key(raw), self.admin_key)
            if ANALYTICS_BETA not in raw.headers.get("anthropic-beta", ""):
                raise AnalyticsError(
                    400, "invalid_request_error", f"this endpoint requires the {ANALYTICS_BETA} beta header"
                )
            lag = timedelta(seconds=self.usage_lag_s)
            entries = self.ledger.entries
            pages = self.usage_page_limit
            if path == USAGE_PATH:
                payload = usage_page(entries, query, now=now, lag=lag, max_pages=pages)
            else:
                if self._prices is None:
                    self._prices = load_prices()
                payload = cost_page(entries, query, now=now, lag=lag, prices=self._prices, max_pages=pages)
        except AnalyticsError as exc:
            status = exc.status
            payload = {
                "type": "error",
                "error": {"type": exc.error_type, "message": exc.message},
                "request_id": request_id,
            }
        _send_json(connection, status, payload, request_id)
        return True


def _send_json(
    connection: _Connection,
    status: int,
    payload: Any,
    request_id: str,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Answer with a JSON body (an endpoint's result, or the API's error object)."""
    body = json.dumps(payload).encode()
    headers = {
        "content-type": "application/json",
        "request-id": request_id,
        "connection": "keep-alive",
        "server": "costwatch-fake-anthropic",
        "content-length": str(len(body)),
        **(extra or {}),
    }
    connection.send(_head(status, headers) + body)


_INSERTED_EVENTS = {
    FaultKind.UNKNOWN_EVENT: PlannedEvent("costwatch_unknown", unknown_event()),
    # Not a delta of the plan (name differs), so billing counts only the planned deltas' tokens.
    FaultKind.MALFORMED_THEN_END: PlannedEvent("costwatch_malformed", malformed_event()),
    FaultKind.NON_UTF8_THEN_END: PlannedEvent("costwatch_non_utf8", non_utf8_event()),
}
"""Faults that insert one event into an otherwise whole stream, and the event."""


class _Attempt:
    """Writes the answer to one request and records its ledger entry."""

    def __init__(
        self,
        server: FakeAnthropicServer,
        connection: _Connection,
        request: ReceivedRequest,
        request_id: str,
        raw_body: bytes,
        api_key_id: str | None = None,
    ) -> None:
        self.server = server
        self.raw_body = raw_body
        self.connection = connection
        self.request = request
        self.request_id = request_id
        body = request.body if isinstance(request.body, dict) else {}
        # Bedrock and Vertex name the model in the path; the platform answers with the canonical id.
        self.route = route_of(request.headers.get("host", ""), request.path, frozenset(request.headers))
        # Bedrock's InvokeModel paths answer in the AWS event-stream framing; its Mantle endpoint
        # (the first-party request under /anthropic/v1/messages) answers as the first-party API does.
        self.event_stream = self.route.platform == BEDROCK and self.route.stream is not None
        model_requested = str(body.get("model", ""))
        self.answered_model = model_requested
        if self.route.platform != ANTHROPIC:
            match = _PATH_MODEL.search(request.path)
            if match is not None:
                model_requested = urllib.parse.unquote(match[1])
                self.answered_model = canonical_model(self.route.platform, model_requested)
        self.base = LedgerEntry(
            attempt=request.attempt,
            request_id=request_id,
            method=request.method,
            path=request.path,
            query=request.query,
            beta=request.beta,
            beta_features=request.beta_features,
            stream=request.stream,
            model_requested=model_requested,
            retry_count=request.retry_count,
            arrival=request.arrival,
            request_body_bytes=len(raw_body),
            fault=None,
            ending=Ending.COMPLETED,
            http_status=None,
            billed_at=time.time(),
            api_key_id=api_key_id,
        )

    def record(self, **changes: Any) -> None:
        self.server.ledger.record(dataclasses.replace(self.base, recorded_at=time.monotonic(), **changes))

    def billed(self, plan: ResponsePlan, prefix: SentPrefix | None) -> dict[str, Any]:
        """Ledger fields for a message whose headers went out; ``prefix=None`` bills the full output."""
        out: dict[str, Any] = {
            "model": plan.model,
            "message_id": plan.message_id,
            "input_tokens": plan.input_tokens,
            "cache_read_tokens": plan.cache_read_tokens,
            "cache_write_5m_tokens": plan.cache_write_5m_tokens,
            "cache_write_1h_tokens": plan.cache_write_1h_tokens,
        }
        if prefix is None:
            out.update(
                output_tokens=plan.output_tokens,
                chars_by_type=MappingProxyType(plan.chars_by_type()),
                tokens_by_type=MappingProxyType(plan.tokens_by_type()),
                stop_reason=plan.stop_reason,
            )
        else:
            out.update(
                output_tokens=prefix.output_tokens,
                chars_by_type=prefix.chars_by_type,
                tokens_by_type=prefix.tokens_by_type,
                events_sent=prefix.events,
                deltas_sent=prefix.deltas,
                body_bytes_sent=prefix.body_bytes,
                stop_reason=plan.stop_reason if prefix.message_delta_sent else None,
            )
        return out

    def headers(self, *, stream: bool, length: int | None = None) -> dict[str, str]:
        bedrock = self.event_stream
        out = {
            "content-type": "text/event-stream; charset=utf-8" if stream else "application/json",
            "request-id": self.request_id,
            "connection": "keep-alive",
            "server": "costwatch-fake-anthropic",
        }
        if bedrock:
            out["x-amzn-requestid"] = out.pop("request-id")
            if stream:
                out["content-type"] = EVENT_STREAM_CONTENT_TYPE
        elif self.route.platform == ANTHROPIC:
            out.update(_rate_limit_headers())
        if stream:
            out["transfer-encoding"] = "chunked"
            out["cache-control"] = "no-cache"
        else:
            out["content-length"] = str(length or 0)
        return out

    def send_error(self, status: int, error_type: str, fault: Fault | None = None) -> bool:
        body = json.dumps(error_body(error_type, error_message(error_type), self.request_id)).encode()
        headers = self.headers(stream=False, length=len(body))
        if fault is not None:
            if fault.retry_after_s is not None:
                headers["retry-after"] = str(fault.retry_after_s)
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
        self.record(fault=fault, ending=Ending.HTTP_ERROR, http_status=status, body_bytes_sent=len(body))
        self.connection.send(_head(status, headers) + body)
        return True

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self.server._stopping.wait(seconds)

    def run(self) -> bool:
        request = self.request
        known_path = request.path.endswith(_MESSAGES_PATH) or self.route.platform != ANTHROPIC
        if request.method != "POST" or not known_path:
            return self.send_error(404, "not_found_error")
        try:
            fault = self.server._choose_fault(request)
        except ValueError:
            return self.send_error(400, "invalid_request_error")
        spec = self.server.spec_for(request) if self.server.spec_for else self.server.spec
        # The body whose cache_control breakpoints the prompt cache bills, if the spec lets it.
        cached = request.body if isinstance(request.body, dict) and spec.models_prompt_caching else None
        if cached is not None:
            try:
                breakpoint_prefixes(cached)
            except TooManyBreakpoints:
                return self.send_error(400, "invalid_request_error")
        # An SDK that sees this before any byte has nothing to retry on, so honor the delay first.
        self.wait(spec.first_byte_delay_s)
        if fault is not None and fault.kind is FaultKind.HTTP_ERROR:
            return self.send_error(fault.status, fault.error_type, fault)
        if fault is not None and fault.kind is FaultKind.RESET:
            self.record(fault=fault, ending=Ending.RESET)
            self.connection.reset()
            return False
        if fault is not None and fault.kind is FaultKind.STALL_BEFORE_HEADERS:
            self.record(fault=fault, ending=Ending.STALL)
            self.connection.wait_for_hangup(fault.seconds)
            return False
        cache = None
        if cached is not None:
            # The API reads and writes the cache as it starts answering, whatever happens to the body.
            prompt = spec.input_tokens
            if prompt is None:
                prompt = input_tokens_for_body(len(self.raw_body))
            cache = self.server.prompt_cache.bill(cached, prompt)
        plan = plan_response(
            spec,
            body=self.raw_body,
            model_requested=self.answered_model,
            arrival=request.arrival,
            cache=cache,
        )
        if request.stream:
            return self.stream(plan, spec, fault)
        return self.json(plan, fault)

    def json(self, plan: ResponsePlan, fault: Fault | None) -> bool:
        body = plan.json_body
        head = _head(200, self.headers(stream=False, length=len(body)))
        billed = self.billed(plan, None)
        if fault is not None and (fault.kind.cuts or fault.kind is FaultKind.STALL_MID_BODY):
            # The API generated the whole message before writing it, so a cut body still bills it all.
            size = fault.count if fault.kind is FaultKind.CUT_AFTER_BYTES else len(body) // 2
            size = min(size, len(body) - 1)
            ending = Ending.STALL if fault.kind is FaultKind.STALL_MID_BODY else Ending.CUT
            self.connection.send(head + body[:size])
            self.record(fault=fault, ending=ending, http_status=200, body_bytes_sent=size, **billed)
            if ending is Ending.STALL:
                self.connection.wait_for_hangup(fault.seconds)
            return False
        self.record(fault=fault, http_status=200, events_sent=0, body_bytes_sent=len(body), **billed)
        self.connection.send(head + body)
        return True

    def stream(self, plan: ResponsePlan, spec: ResponseSpec, fault: Fault | None) -> bool:
        events = plan.events
        inserted = _INSERTED_EVENTS.get(fault.kind) if fault is not None else None
        if fault is not None and inserted is not None:
            position = min(fault.count, len(events) - 1)
            events = (*events[:position], inserted, *events[position:])
        if self.event_stream:
            events = bedrock_events(events, plan)
        cut = stream_cut_for(fault, events)
        if fault is None and self.server.drop_profile is not None:
            nth = self.server.drop_profile.choose(self.request, plan.delta_count)
            if nth is not None:
                position = position_of_delta(events, nth)
                fault = Fault.cut_mid_event(after_events=position)
                cut = stream_cut_for(fault, events)
        stop_at = len(events)
        if fault is not None and fault.kind in (
            FaultKind.ERROR_EVENT,
            FaultKind.STALL_MID_BODY,
            FaultKind.END_EARLY,
        ):
            stop_at = position_after_deltas(events, fault.count)
        elif fault is not None and fault.kind is FaultKind.MALFORMED_JSON:
            stop_at = min(fault.count, len(events))
        if cut is not None:
            stop_at = cut.whole_events
        deadline = None
        if fault is not None and fault.kind is FaultKind.CUT_AFTER_SECONDS and fault.seconds is not None:
            deadline = time.monotonic() + fault.seconds

        self.connection.send(_head(200, self.headers(stream=True)))
        for position in range(stop_at):
            if position > 0 and spec.event_interval_s > 0:
                pause = spec.event_interval_s
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                self.wait(pause)
            if deadline is not None and time.monotonic() >= deadline:
                cut = StreamCut(position)
                break
            if cut is None and stop_at == len(events) and position == len(events) - 1:
                # The entry must exist before the client can see message_stop.
                self.record(
                    fault=fault,
                    http_status=200,
                    **self.billed(plan, sent_prefix(events, StreamCut(len(events), len(TERMINAL_CHUNK)))),
                )
            try:
                self.connection.send(events[position].framed)
            except OSError:
                prefix = sent_prefix(events, StreamCut(position))
                self.record(
                    fault=fault,
                    ending=Ending.CLIENT_DISCONNECTED,
                    http_status=200,
                    **self.billed(plan, prefix),
                )
                return False

        if cut is not None:
            return self.cut(plan, events, fault, cut)
        if stop_at < len(events) and fault is not None:
            return self.end_early(plan, events, fault, stop_at)
        self.connection.send(TERMINAL_CHUNK)
        return True

    def cut(
        self, plan: ResponsePlan, events: tuple[PlannedEvent, ...], fault: Fault | None, cut: StreamCut
    ) -> bool:
        if cut.partial_bytes:
            following = events[cut.whole_events].framed if cut.whole_events < len(events) else TERMINAL_CHUNK
            self.connection.send(following[: cut.partial_bytes])
        prefix = sent_prefix(events, cut)
        self.record(fault=fault, ending=Ending.CUT, http_status=200, **self.billed(plan, prefix))
        return False

    def end_early(
        self, plan: ResponsePlan, events: tuple[PlannedEvent, ...], fault: Fault, stop_at: int
    ) -> bool:
        prefix = sent_prefix(events, StreamCut(stop_at))
        billed = self.billed(plan, prefix)
        if fault.kind is FaultKind.STALL_MID_BODY:
            self.record(fault=fault, ending=Ending.STALL, http_status=200, **billed)
            self.connection.wait_for_hangup(fault.seconds)
            return False
        if fault.kind is FaultKind.END_EARLY:
            self.record(fault=fault, ending=Ending.ENDED_EARLY, http_status=200, **billed)
            self.connection.send(TERMINAL_CHUNK)
            return True
        if fault.kind is FaultKind.ERROR_EVENT and self.event_stream:
            frame = bedrock_exception_frame("modelStreamErrorException", error_message(fault.error_type))
            last, ending = chunk(frame), Ending.ERROR_EVENT
        elif fault.kind is FaultKind.ERROR_EVENT:
            last, ending = chunk(error_event(fault.error_type, self.request_id)), Ending.ERROR_EVENT
        elif self.event_stream:
            malformed = malformed_event().split(b"\ndata: ", 1)[1].rstrip(b"\n")
            last, ending = chunk(bedrock_frame(malformed)), Ending.MALFORMED
        else:
            last, ending = chunk(malformed_event()), Ending.MALFORMED
        billed.update(
            events_sent=prefix.events + 1, body_bytes_sent=prefix.body_bytes + len(last) + len(TERMINAL_CHUNK)
        )
        self.record(fault=fault, ending=ending, http_status=200, **billed)
        self.connection.send(last + TERMINAL_CHUNK)
        return True
