"""A fault-injecting HTTP proxy in front of the moto S3 server, for storage-fault tests.

`S3FaultProxy(upstream)` listens on 127.0.0.1 (its `endpoint`) and forwards every request to the
S3 server at `upstream` (the `s3_endpoint` fixture). Clients reach it like any S3 endpoint: put it
in a job's [storage.s3] endpoint_url, and Ray worker processes, which connect over TCP like the
driver, go through it as well. On a share of requests it answers as a troubled store would:

  * SlowDown: status 503 with S3's SlowDown XML error body (no body for HEAD), the request is
    not forwarded;
  * stall: reads the request, then waits `stall_seconds` (set it above the client's read timeout)
    and closes the connection without an answer, the request is not forwarded (a lost request);
  * AccessDenied: after `deny_writes(prefix)`, every PUT/POST/DELETE under the "bucket/key"
    prefix gets 403 with S3's AccessDenied XML body (a bulk DeleteObjects POST counts when one of
    its keys is under the prefix), while reads still pass: an output whose write permission is
    taken away after the job's validation probe has passed.

Which requests fail is drawn from seeded RNGs, one draw per request (one stream for reads, one for
writes), so a fault rate is a deterministic share of the requests in the order they arrive; the
order of concurrent requests depends on thread timing, that of one client's sequential writes
does not. Every answer is recorded as an Event (phase, outcome, read/write, method, path, and
botocore's attempt number and attempt limit from its amz-sdk-request header), so tests can assert
that faults really happened, and where: `count(...)`. `phase(name)` labels the events that follow,
e.g. "run" once validation is over.

This is test machinery only: HTTP/1.1 with Content-Length or chunked request bodies, path-style
S3 requests (what botocore sends to an endpoint_url of 127.0.0.1). It is not a general proxy.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOWDOWN = "slowdown"
STALL = "stall"
DENIED = "denied"
FORWARDED = "forwarded"
READ = "read"
WRITE = "write"

_WRITE_METHODS = ("PUT", "POST", "DELETE")
# Hop-by-hop headers (RFC 9110) and those the proxy sets itself are not relayed.
_NOT_RELAYED = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
                "content-length", "expect", "server", "date"}


def _s3_error(code: str, message: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>").encode()


@dataclass(frozen=True)
class Event:
    phase: str  # label set by S3FaultProxy.phase() when the request arrived
    outcome: str  # slowdown | stall | denied | forwarded
    direction: str  # read (GET/HEAD) | write (PUT/POST/DELETE)
    method: str
    path: str  # "bucket/key" as requested, unquoted, without the query
    attempt: int | None  # botocore's attempt number of this call (its amz-sdk-request header)
    max_attempts: int | None  # botocore's attempt limit for the call: shows which retry config the client had


class S3FaultProxy:
    """See the module docstring. Use as a context manager, or call start() and stop()."""

    def __init__(self, upstream: str, *, slowdown_rate: float = 0.0, stall_rate: float = 0.0,
                 stall_seconds: float = 4.0, max_stalls: int | None = None, seed: int = 0):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        # One stream per direction: the driver writes one request at a time, so with its own stream
        # the n-th write always gets the same fate, whatever the workers' concurrent reads do.
        self._rngs = {READ: random.Random(2 * seed), WRITE: random.Random(2 * seed + 1)}
        self._stopping = threading.Event()
        self._phase = "start"
        self._deny_prefix: str | None = None
        self._stalls = 0
        self.events: list[Event] = []
        self.set_faults(slowdown_rate=slowdown_rate, stall_rate=stall_rate, max_stalls=max_stalls)
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, *, slowdown_rate: float = 0.0, stall_rate: float = 0.0, max_stalls: int | None = None) -> None:
        """From now on, answer this share of requests with 503 SlowDown / a stall (at most max_stalls stalls in all)."""
        if not (0 <= slowdown_rate and 0 <= stall_rate and slowdown_rate + stall_rate <= 1):
            raise ValueError(f"rates must be >= 0 and sum to at most 1, got {slowdown_rate} and {stall_rate}")
        with self._lock:
            self.slowdown_rate, self.stall_rate, self.max_stalls = slowdown_rate, stall_rate, max_stalls

    def deny_writes(self, prefix: str | None) -> None:
        """From now on, answer writes under "bucket/key-prefix" with 403 AccessDenied (None: allow again)."""
        with self._lock:
            self._deny_prefix = prefix.strip("/") if prefix else None

    def phase(self, name: str) -> None:
        """Label the events of the requests that arrive from now on."""
        with self._lock:
            self._phase = name

    def count(self, outcome: str | None = None, direction: str | None = None, phase: str | None = None,
              path_prefix: str | None = None) -> int:
        """How many requests got `outcome` (any when None), optionally only reads or writes, one phase,
        paths under a prefix."""
        with self._lock:
            events = list(self.events)
        return sum(1 for e in events
                   if (outcome is None or e.outcome == outcome) and (direction is None or e.direction == direction)
                   and (phase is None or e.phase == phase)
                   and (path_prefix is None or e.path.startswith(path_prefix.strip("/"))))

    def summary(self) -> Counter:
        with self._lock:
            return Counter((e.outcome, e.direction) for e in self.events)

    # -- decisions (called by the handler threads) --------------------------------------------

    def _decide(self, method: str, path: str, body: bytes, sdk_request: str) -> Event:
        direction = WRITE if method in _WRITE_METHODS else READ
        with self._lock:
            outcome = FORWARDED
            if direction == WRITE and self._deny_prefix is not None and _writes_under(path, body, self._deny_prefix):
                outcome = DENIED
            else:
                draw = self._rngs[direction].random()
                if draw < self.slowdown_rate:
                    outcome = SLOWDOWN
                elif draw < self.slowdown_rate + self.stall_rate and (self.max_stalls is None
                                                                       or self._stalls < self.max_stalls):
                    outcome = STALL
                    self._stalls += 1
            sdk = dict(re.findall(r"(\w+)=(\d+)", sdk_request))
            attempt, limit = (int(sdk[k]) if k in sdk else None for k in ("attempt", "max"))
            event = Event(self._phase, outcome, direction, method, path, attempt, limit)
            self.events.append(event)
        return event


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (its read timeout) while we answered: expected here


def _writes_under(path: str, body: bytes, prefix: str) -> bool:
    if path.startswith(prefix):
        return True
    # DeleteObjects: POST /bucket?delete, the keys are in the XML body.
    bucket = path.split("/", 1)[0]
    keys = re.findall(rb"<Key>([^<]*)</Key>", body)
    return any(f"{bucket}/{k.decode()}".startswith(prefix) for k in keys)


def _handler_for(proxy: S3FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by the base class

        def log_message(self, *args) -> None:  # quiet: tests read the counters, not a log
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            body = self._read_body()
            split = urlsplit(self.path)
            event = proxy._decide(self.command, unquote(split.path).lstrip("/"), body,
                                  self.headers.get("amz-sdk-request", ""))
            if event.outcome == STALL:
                proxy._stopping.wait(proxy.stall_seconds)
                self.close_connection = True  # no answer at all: the client's read timeout fires
                return
            if event.outcome == SLOWDOWN:
                self._answer(503, [("Content-Type", "application/xml")],
                             _s3_error("SlowDown", "Please reduce your request rate."))
                return
            if event.outcome == DENIED:
                self._answer(403, [("Content-Type", "application/xml")], _s3_error("AccessDenied", "Access Denied"))
                return
            self._forward(body)

        def _forward(self, body: bytes) -> None:
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _NOT_RELAYED:
                        connection.putheader(name, value)  # Host kept: it is part of the signature
                if body or self.command in _WRITE_METHODS:
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body or None)
                response = connection.getresponse()
                data = response.read()
                headers = [(n, v) for n, v in response.getheaders() if n.lower() not in _NOT_RELAYED]
                # HEAD answers carry the object's length but no body.
                length = int(response.getheader("Content-Length") or 0) if self.command == "HEAD" else None
                self._answer(response.status, headers, data, length)
            finally:
                connection.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
