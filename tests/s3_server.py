"""A real S3 endpoint on loopback for the tests and benchmarks: moto's server (as s3fs tests itself), with
the bytes and requests it serves counted at the server, in its WSGI app."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Served:
    """What the server answered: GET requests and the body bytes they carried (all object reads); the body
    bytes it received (PUT and POST: uploads); and the server-side copies it made (PUT with a copy source)."""

    gets: int = 0
    get_bytes: int = 0
    requests: int = 0
    received_bytes: int = 0
    copies: int = 0

    def reset(self) -> None:
        self.gets = self.get_bytes = self.requests = self.received_bytes = self.copies = 0


@dataclass
class Hold:
    """The first ``method`` request for a key ending in ``key_suffix``, held unanswered: ``reached`` is set when it
    arrives; once ``release`` is set it is refused (503) without reaching the store, as a request whose client
    died mid-upload never completes."""

    method: str
    key_suffix: str
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def matches(self, environ: dict) -> bool:
        return environ["REQUEST_METHOD"] == self.method and environ.get("PATH_INFO", "").endswith(self.key_suffix)


class CountingMotoServer:
    """``moto.server.ThreadedMotoServer`` whose app counts what it serves (and can hold a request: :class:`Hold`)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.served = Served()
        self.holds: list[Hold] = []
        self._lock = threading.Lock()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server._server_entry = self._entry  # the same entry, with the app wrapped

    def _entry(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args, **kwargs) -> None:  # one line per request would drown the test output
                pass

        def counted(environ, start_response):
            # counted before the answer is sent: a client that has its answer finds it counted
            method = environ["REQUEST_METHOD"]
            with self._lock:
                self.served.requests += 1
                self.served.gets += method == "GET"
                if method in ("PUT", "POST"):
                    self.served.received_bytes += int(environ.get("CONTENT_LENGTH") or 0)
                    self.served.copies += "HTTP_X_AMZ_COPY_SOURCE" in environ
                held = next((h for h in self.holds if h.matches(environ)), None)
                if held is not None:
                    self.holds.remove(held)
            if held is not None:
                held.reached.set()
                held.release.wait(timeout=300)
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return
            body = app(environ, start_response)
            try:
                for chunk in body:
                    if method == "GET":
                        with self._lock:
                            self.served.get_bytes += len(chunk)
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()

        server = self._server
        server._server = make_server(server._ip_address, server._port, counted, True, request_handler=QuietHandler)
        server._server_ready_event.set()
        server._server.serve_forever()

    def hold(self, method: str, key_suffix: str) -> Hold:
        held = Hold(method, key_suffix)
        with self._lock:
            self.holds.append(held)
        return held

    @property
    def endpoint(self) -> str:
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_endpoint() -> Iterator[CountingMotoServer]:
    """A started server, with the standard AWS environment (AWS_ENDPOINT_URL included) pointing at it."""
    server = CountingMotoServer()
    server.start()
    saved = {k: os.environ.get(k) for k in [*ENVIRONMENT, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENVIRONMENT, AWS_ENDPOINT_URL=server.endpoint)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def s3fs_for(server: CountingMotoServer):
    """An s3fs filesystem on the endpoint, for putting fixtures in and reading outputs back."""
    import s3fs

    # moto completes a multipart upload by concatenating its parts in memory: for a 1.2 GB object on a loaded machine
    # that can outlast botocore's 60 s read timeout, and the retried CompleteMultipartUpload then fails in moto
    config = {"read_timeout": 900, "retries": {"max_attempts": 1}}
    return s3fs.S3FileSystem(
        endpoint_url=server.endpoint, key="testing", secret="testing", skip_instance_cache=True, config_kwargs=config
    )
