"""A real S3 endpoint for the tests, and a proxy that breaks it on purpose.

`s3_endpoint` (session): moto's `ThreadedMotoServer` on 127.0.0.1, port 0: the S3 HTTP API that
s3fs and boto3 talk to, honouring conditional writes and keeping multipart uploads invisible
until completed. `s3` (per test): a fresh bucket on it, the AWS variables a client needs in
`os.environ` (and in `s3.env` for subprocesses), nothing from the machine's own AWS config.

`FaultProxy`: an HTTP proxy on 127.0.0.1 between the client and moto that, per request, by
chance or by rule, answers 503 SlowDown or 500 InternalError without forwarding, drops the
connection before forwarding, forwards and then drops the connection instead of answering (the
request happened, the client never learns it), or refuses with 403. It counts what it did and
stops itself after `lifetime` seconds.
"""

from __future__ import annotations

import http.client
import logging
import random
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/ksuit-tests/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/ksuit-tests/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Endpoint:
    url: str

    def client(self, url: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=url or self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


@dataclass
class S3:
    """A bucket of the test endpoint."""

    endpoint: Endpoint
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def keys(self, prefix: str = "") -> list[str]:
        client = self.endpoint.client()
        keys, token = [], {}
        while True:
            page = client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **token)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def uploads(self, prefix: str = "") -> list[str]:
        page = self.endpoint.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return sorted(u["Key"] for u in page.get("Uploads", []))

    def get(self, key: str) -> bytes:
        return self.endpoint.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.endpoint.client().put_object(Bucket=self.bucket, Key=key, Body=data)


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield Endpoint(f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint.url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"ksuit-{secrets.token_hex(6)}"
    s3_endpoint.client().create_bucket(Bucket=bucket)
    return S3(s3_endpoint, bucket, env)


# ---- the fault proxy --------------------------------------------------------------------------

FAULTS = ("503", "500", "drop", "lost")
_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    """Apply `fault` to the next `count` requests whose method is `method` and whose path
    contains `contains` (and, when given, whose query contains `query`)."""

    method: str
    contains: str
    fault: str
    count: int = 1
    query: str | None = None


class FaultProxy:
    """See the module docstring. `rates`: `{fault: probability}` per request."""

    def __init__(
        self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0, lifetime: float = 300
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rates = dict(rates or {})
        self.rules: list[Rule] = []
        self.counts: dict[str, int] = {"requests": 0}
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault or "ok")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.deny_all = False
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def draw(self, method: str, path: str, query: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            fault = None
            for rule in self.rules:
                if (
                    rule.count > 0
                    and rule.method == method
                    and rule.contains in path
                    and (rule.query is None or rule.query in query)
                ):
                    rule.count -= 1
                    fault = rule.fault
                    break
            if fault is None and self.deny_all:
                fault = "403"
            if fault is None:
                x, acc = self._rng.random(), 0.0
                for name in FAULTS:
                    acc += self.rates.get(name, 0.0)
                    if x < acc:
                        fault = name
                        break
            if fault is not None:
                self.counts[fault] = self.counts.get(fault, 0) + 1
            self.log.append((method, path, fault or "ok"))
            return fault

    def faults(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "requests")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        path, _, query = self.path.partition("?")
        fault = self.owner.draw(self.command, unquote(path), query)
        if fault == "drop":
            self.close_connection = True
            return
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>proxy</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        skip = {"host", "expect", "connection", "transfer-encoding", "content-length", "keep-alive"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Host"] = self.headers.get("Host", "")
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault == "lost":
            self.close_connection = True
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def proxied_options(proxy: FaultProxy, **extra: object) -> dict[str, object]:
    """Storage options that send a backend's requests through `proxy`."""
    return {"endpoint_url": proxy.url, "skip_instance_cache": True, **extra}


__all__ = [
    "AWS_ENV",
    "FAULTS",
    "S3",
    "Endpoint",
    "FaultProxy",
    "Rule",
    "proxied_options",
    "s3",
    "s3_endpoint",
]
