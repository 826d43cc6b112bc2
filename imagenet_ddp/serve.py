"""A web page and a JSON endpoint for one checkpoint: drop an image, see its top-5 in your language.

    python predict.py --checkpoint runs/demo/best.pt --serve            # http://127.0.0.1:8000/
    curl --data-binary @cat.jpg 'http://127.0.0.1:8000/api/predict?lang=es&topk=5'

    GET  /              the page (imagenet_ddp/web/: plain HTML, CSS and JS; nothing loaded from elsewhere)
    GET  /api/info      {"model", "num_classes", "languages": {code: name}, "lang", "topk", "max_upload_bytes"}
    POST /api/predict   body: the image file as is; ?lang=es&topk=5 -> {"lang", "top": [{"class_index",
                        "wnid", "name_en", "name", "probability"}, ...]}
    Errors are {"error": "one line in English", "code": "..."}: 400 bad_lang, bad_topk or bad_length
    (Content-Length), 403 wrong_host, 404 not_found, 408 timeout (body not in within 60 s), 411
    no_length, 413 too_large, 415 empty, not_an_image, too_many_pixels (more than max_pixels) or
    damaged, 503 busy (max_concurrent predictions running). The page words each code in the user's
    language (web/i18n.js); the JSON API and the CLI speak English.

Binds to 127.0.0.1 unless told otherwise, and then answers only requests addressed to a loopback name
(a web page elsewhere cannot reach it through DNS rebinding). Standard library only (http.server):
one model, a few people, no build step.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from imagenet_ddp.errors import UserError
from imagenet_ddp.inference import Classifier, ImageError, as_record, load_image

WEB_DIR = Path(__file__).with_name("web")
STATIC = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
    "/i18n.js": ("i18n.js", "text/javascript"),
}
LANGUAGE_NAMES = {
    "en": "English",
    "es": "Español",
    "fr": "Français",
    "de": "Deutsch",
    "it": "Italiano",
    "pt": "Português",
}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# An oversize body is read and dropped up to this many bytes, so that the client, still sending, gets the
# 413 answer instead of a reset connection; beyond it the connection is closed unread.
DRAIN_LIMIT = 256 << 20
# Each prediction holds its decoded image: ~3 bytes a pixel, and as much again while it is resized. The
# CLI takes up to MAX_PIXELS (179 Mpx, ~0.5 GB); a server shared by people keeps each request and their
# number smaller: 50 Mpx (a large phone photo) x 4 at once is under 1.5 GB.
SERVER_MAX_PIXELS = 50_000_000
MAX_CONCURRENT = 4
BUSY_WAIT_S = 30  # how long a request waits for a free slot before it is answered 503
BODY_DEADLINE_S = 60  # the whole upload must arrive within this (a client trickling bytes holds a thread)
# Connections the kernel queues before the server accepts them (http.server's default, 5, resets
# the rest: a page opened by a class, a load test); Linux caps it at net.core.somaxconn (4096).
BACKLOG = 1024
# Connections served at once, a thread each (most wait for a prediction slot or read an upload);
# beyond it new connections wait in the backlog instead of starting threads without bound.
MAX_CONNECTIONS = 256


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def error(code: str, message: str) -> dict:
    """An error answer: `message` for people reading JSON, `code` for the page to word in their language."""
    return {"error": message, "code": code}


class App:
    """What the handlers share: the classifier (one forward pass at a time), settings, the page."""

    def __init__(
        self,
        clf: Classifier,
        *,
        lang="en",
        topk=5,
        max_upload_bytes=20_000_000,
        max_pixels=SERVER_MAX_PIXELS,
        max_concurrent=MAX_CONCURRENT,
        loopback_only=True,
    ):
        from imagenet_ddp.labels import available_languages

        self.clf, self.lang, self.topk, self.max_upload_bytes = clf, lang, topk, max_upload_bytes
        self.max_pixels, self.max_concurrent = max_pixels, max_concurrent
        if max_concurrent < 1 or max_pixels < 1:
            raise UserError("the server needs max_concurrent >= 1 and max_pixels >= 1")
        self.loopback_only = loopback_only
        self.lock = threading.Lock()  # one forward pass at a time
        self.slots = threading.BoundedSemaphore(max_concurrent)  # uploads read and decoded at once
        self.languages = {code: LANGUAGE_NAMES.get(code, code) for code in available_languages()}
        self.files = {route: ((WEB_DIR / name).read_bytes(), kind) for route, (name, kind) in STATIC.items()}

    def info(self) -> dict:
        return {
            "model": self.clf.architecture["name"],
            "num_classes": self.clf.num_classes,
            "languages": self.languages,
            "lang": self.lang,
            "topk": self.topk,
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_concurrent": self.max_concurrent,
        }

    def predict(self, data: bytes, query: dict[str, list[str]]) -> tuple[int, dict]:
        lang = query.get("lang", [self.lang])[-1]
        if lang not in self.languages:
            return 400, error(
                "bad_lang", f"no class names for language {lang!r}; available: {', '.join(self.languages)}"
            )
        try:
            topk = int(query.get("topk", [self.topk])[-1])
        except ValueError:
            topk = 0
        if not 1 <= topk <= self.clf.num_classes:
            return 400, error("bad_topk", f"topk must be a whole number from 1 to {self.clf.num_classes}")
        try:
            # Decoding runs in parallel (up to max_concurrent), outside the lock.
            image = self.clf.preprocess(load_image(data, self.max_pixels))
        except ImageError as e:
            return 415, error(e.code, str(e))
        with self.lock:
            [prediction] = self.clf.predict([image], topk, lang)
        return 200, as_record(None, prediction, lang)


class Handler(BaseHTTPRequestHandler):
    server_version = "imagenet-ddp"
    timeout = 60  # a client that stops sending does not hold its thread for ever
    app: App  # set on the subclass make_server creates

    def do_GET(self):
        url = urlsplit(self.path)
        if not self._host_allowed():
            return
        if url.path == "/api/info":
            return self._json(200, self.app.info())
        if url.path not in self.app.files:
            return self._json(
                404,
                error("not_found", f"no page {url.path}; the page is /, the API /api/info and /api/predict"),
            )
        body, kind = self.app.files[url.path]
        self._send(200, body, f"{kind}; charset=utf-8")

    def do_POST(self):
        url = urlsplit(self.path)
        if not self._host_allowed():
            return
        if url.path != "/api/predict":
            return self._json(
                404, error("not_found", f"no endpoint {url.path}; POST the image to /api/predict")
            )
        given = self.headers.get("Content-Length")
        if given is None or "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True  # a body may follow that this server will not read
            return self._json(
                411, error("no_length", "send the image as the request body, with a Content-Length")
            )
        if not given.strip().isascii() or not given.strip().isdigit():  # int() takes "-1", "+5", "1_000"
            self.close_connection = True
            return self._json(
                400, error("bad_length", f"Content-Length must be a number of bytes, not {given!r}")
            )
        length, limit = int(given), self.app.max_upload_bytes
        if length > limit:
            left = length if length <= DRAIN_LIMIT else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
            self.close_connection = True
            message = f"the upload is {_megabytes(length)}: larger than the limit of {_megabytes(limit)}"
            return self._json(413, error("too_large", message))
        data = self._read_body(length)
        if data is None:
            self.close_connection = True
            return self._json(408, error("timeout", f"the upload did not arrive within {BODY_DEADLINE_S} s"))
        # The slot covers decoding and the forward pass only: a slow upload holds no slot.
        if not self.app.slots.acquire(timeout=BUSY_WAIT_S):
            busy = f"busy: all {self.app.max_concurrent} prediction slots are taken; try again"
            return self._json(503, error("busy", busy))
        try:
            status, body = self.app.predict(data, parse_qs(url.query))
        finally:
            self.app.slots.release()
        self._json(status, body)

    def _read_body(self, length: int) -> bytes | None:
        """The request body, or None when it does not arrive within BODY_DEADLINE_S (or the client
        closes early): the handler's own timeout is per receive, which a trickle never reaches."""
        deadline, chunks, left = time.monotonic() + BODY_DEADLINE_S, [], length
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    return None
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            return None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    def _host_allowed(self) -> bool:
        host = _host_name(self.headers.get("Host") or "")
        if not self.app.loopback_only or host in LOOPBACK_NAMES:
            return True
        self._json(
            403, error("wrong_host", f"this server answers requests for 127.0.0.1 or localhost, not {host!r}")
        )
        return False

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if not getattr(self.server, "quiet", False):
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")


def _host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'localhost' -> 'localhost'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog and a bound on the threads: every client is
    answered (200, or 503 after BUSY_WAIT_S), none reset for want of a queue."""

    daemon_threads = True
    request_queue_size = BACKLOG
    max_connections = MAX_CONNECTIONS

    def server_activate(self) -> None:
        self._connections = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        self._connections.acquire()  # at the cap, the accept loop waits; clients wait in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


def make_server(
    clf: Classifier,
    host="127.0.0.1",
    port=8000,
    *,
    quiet=False,
    backlog=BACKLOG,
    max_connections=MAX_CONNECTIONS,
    **settings,
) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free one; see server.server_address), not yet serving."""
    app = App(clf, loopback_only=is_loopback(host), **settings)
    handler = type("BoundHandler", (Handler,), {"app": app})
    limits = {"request_queue_size": backlog, "max_connections": max_connections}
    server_class = type("BoundServer", (Server,), limits)
    if ":" in host:
        import socket

        server_class.address_family = socket.AF_INET6
    try:
        server = server_class((host, port), handler)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port)"
        ) from None
    server.quiet = quiet
    return server


def serve(clf: Classifier, host="127.0.0.1", port=8000, **settings) -> None:
    """Serve until Ctrl-C."""
    server = make_server(clf, host, port, **settings)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"serving {clf.architecture['name']} ({clf.num_classes} classes) at http://{shown}:{bound_port}/",
        flush=True,
    )
    if not is_loopback(host):
        print(
            f"note: {host} is reachable from other machines; anyone who can reach it can use it", flush=True
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
