"""A fault-injecting HTTP proxy in front of the embedded S3 endpoint (moto).

Every request really crosses 127.0.0.1 twice; a configurable share of them gets a
500 InternalError or a 503 SlowDown (S3's own XML error bodies), a delay, or a TCP
reset (RST) instead, decided before forwarding, as a real flaky store would fail.
Settings can change while it runs (e.g. `down=True`: every request fails), so a test
can make the store go away in the middle of a job."""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_BODIES = {
    403: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>injected</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
}


class FaultyS3:
    def __init__(self, upstream: str, *, error_rate: float = 0.0, delay_rate: float = 0.0, delay_s: float = 0.3, reset_rate: float = 0.0, seed: int = 0):
        self.upstream = urlparse(upstream)
        self.error_rate, self.delay_rate, self.delay_s, self.reset_rate = error_rate, delay_rate, delay_s, reset_rate
        self.down = False  # every request fails with 503
        self.slow_puts_s = 0.0  # extra delay on PUT requests (slow uploads)
        self.deny: set[str] = set()  # paths containing any of these get 403 AccessDenied
        self.deny_buckets: set[str] = set()  # requests on these buckets themselves (not their objects) get 403
        self.deny_deletes: set[str] = set()  # deletes of paths containing these get 403 (batch deletes: any)
        # batch deletes naming a key that contains one of these are answered 200 with a
        # per-key AccessDenied for every key and not forwarded: how S3 refuses some keys
        self.refuse_keys_in_batch: set[str] = set()
        # (method, path substring) -> how many more matching requests are forwarded to
        # the store and then answered with a reset: the request took effect, its response was lost
        self.lose_response: dict[tuple[str, str], int] = {}
        self.counts = {"requests": 0, "errors": 0, "delays": 0, "resets": 0, "forwarded": 0, "lost_responses": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                deleting = self.command == "DELETE" or (self.command == "POST" and "delete" in self.path)
                batch = self.command == "POST" and any(d.encode() in body for d in proxy.deny_deletes)
                on_bucket = urlparse(self.path).path.strip("/") in proxy.deny_buckets  # HEAD / PUT / ?location of the bucket
                denied = on_bucket or any(d in self.path for d in proxy.deny) or (deleting and (batch or any(d in self.path for d in proxy.deny_deletes)))
                if self.command == "POST" and "delete" in self.path and any(k.encode() in body for k in proxy.refuse_keys_in_batch):
                    keys = re.findall(rb"<Key>(.*?)</Key>", body)
                    out = b"<?xml version='1.0' encoding='UTF-8'?><DeleteResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>" + b"".join(
                        b"<Error><Key>" + k + b"</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>" for k in keys) + b"</DeleteResult>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return
                fault = 403 if denied else proxy._decide(self.command)
                if fault == "reset":
                    # RST instead of a response: what a dropped connection looks like
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in (403, 500, 503):
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_BODIES[fault])))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(ERROR_BODIES[fault])
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or "Content-Length" in self.headers:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.counts["forwarded"] += 1
                    lose = next((k for k, n in proxy.lose_response.items() if n > 0 and k[0] == self.command and k[1] in self.path), None)
                    if lose is not None:
                        proxy.lose_response[lose] -= 1
                        proxy.counts["lost_responses"] += 1
                if lose is not None:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # a HEAD response's Content-Length is the object's size: keep it
                    if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _decide(self, method: str):
        with self._lock:
            self.counts["requests"] += 1
            if self.down:
                self.counts["errors"] += 1
                return 503
            r = self._rng.random()
            if r < self.error_rate:
                self.counts["errors"] += 1
                return self._rng.choice((500, 503))
            if r < self.error_rate + self.reset_rate:
                self.counts["resets"] += 1
                return "reset"
            delay = self.delay_s if r < self.error_rate + self.reset_rate + self.delay_rate else 0.0
            if method == "PUT":
                delay += self.slow_puts_s
            if delay:
                self.counts["delays"] += 1
        if delay:
            time.sleep(delay)
        return None

    def start(self) -> FaultyS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
