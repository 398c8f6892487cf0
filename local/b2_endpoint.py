"""A B2-native HTTP endpoint on loopback, built on b2sdk's own RawSimulator: TEST INFRASTRUCTURE.

No machine here reaches Backblaze. This server speaks B2's native API (v3, as b2sdk's v2 layer
calls it) and delegates every call to b2sdk's RawSimulator, so the product's real b2sdk client,
its HTTP layer, retries and SHA-1 checks run unchanged; the CLI reaches it through B2_REALM.

  JSON API      POST /b2api/v3/b2_<call>   -> RawSimulator.<call>(api_url, token, **snake_case(body))
  authorize     GET  /b2api/v3/b2_authorize_account (Basic auth); URLs rewritten to this server
  upload        POST /upload?u=<simulator upload URL>, /upload_part?u=...
  download      GET|HEAD /file/<bucket>/<name>, /b2api/v3/b2_download_file_by_id?fileId=<id> (Range supported)
  test control  POST /_b2/faults {"upload_errors": n}   n transient 503s on the next uploads (0: none)
                                 {"upload_bytes_per_s": r} upload bodies read at r bytes/s in all (a slow uplink)
                                 {"upload_stall_after": b} upload bodies stop being read after b bytes (a stall)
                each call replaces every earlier fault; {} clears them

Run: python local/b2_endpoint.py --port 16500 --bucket opencode-memory --info-file b2.json
(the info file receives {"realm", "key_id", "key", "bucket"}).
"""

from __future__ import annotations

import argparse
import base64
import inspect
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from b2sdk.v2 import RawSimulator
from b2sdk.v2 import exception as b2_exception

STATUS_FOR_ERROR = {
    "InvalidAuthToken": (401, "bad_auth_token"),
    "Unauthorized": (401, "unauthorized"),
    "NonExistentBucket": (400, "bad_bucket_id"),
    "BadUploadUrl": (400, "bad_request"),
    "FileNotPresent": (404, "not_found"),
    "ServiceError": (503, "service_unavailable"),
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def to_json(value: Any) -> bytes:
    return json.dumps(value, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)).encode()


def wall_clock_ms() -> Iterator[int]:
    """Upload timestamps as B2 gives them: milliseconds since the epoch, strictly increasing."""
    last = 0
    while True:
        last = max(last + 1, int(time.time() * 1000))
        yield last


class Endpoint:
    """The simulator plus what the HTTP layer needs: its own URL and a lock (the simulator is not
    thread-safe)."""

    def __init__(self, base_url: str, bucket: str, part_size: int) -> None:
        self.sim = RawSimulator()
        self.lock = threading.Lock()
        self.base_url = base_url
        self.part_size = part_size
        self.rate = 0                      # upload bytes per second over all connections; 0: unlimited
        self.stall_after: int | None = None
        self.uploaded = 0                  # upload body bytes read since the faults were set
        self.uplink_free_at = 0.0
        self.released = threading.Event()  # set when the faults change: a stalled read gives up
        self.key_id, self.key = self.sim.create_account()
        token = self.sim.authorize_account(self.sim.API_URL, self.key_id, self.key)["authorizationToken"]
        self.sim.create_bucket(self.sim.API_URL, token, self.key_id, bucket, "allPrivate")
        # the simulator counts upload times up from 5 s after 1970; real B2 gives the wall clock
        self.sim.bucket_name_to_bucket[bucket].upload_timestamp_counter = wall_clock_ms()
        self.bucket = bucket

    def set_faults(self, knobs: dict) -> None:
        with self.lock:
            self.sim.upload_errors = []  # replaces what is left of an earlier storm
            self.sim.set_upload_errors([b2_exception.ServiceError("503 simulated")] * knobs.get("upload_errors", 0))
            self.rate = int(knobs.get("upload_bytes_per_s", 0))
            self.stall_after = knobs.get("upload_stall_after")
            self.uploaded = 0
            self.released.set()
            self.released = threading.Event()

    def info(self) -> dict[str, str]:
        return {"realm": self.base_url, "key_id": self.key_id, "key": self.key, "bucket": self.bucket}


class B2Handler(BaseHTTPRequestHandler):
    endpoint: Endpoint  # set by make_handler

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK of the headers on every keep-alive request.
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def fail(self, exc: Exception) -> None:
        status, code = STATUS_FOR_ERROR.get(type(exc).__name__, (400, "bad_request"))
        code = getattr(exc, "code", None) or code
        self.reply(status, to_json({"status": status, "code": code, "message": str(exc)}))

    def body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        if not self.path.startswith("/upload") or not (self.endpoint.rate or self.endpoint.stall_after is not None):
            return self.rfile.read(size)
        # A small receive window, so that the kernel cannot take in megabytes the "uplink" has
        # not carried yet; then read at the shared rate, or stop reading.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        chunks, released = [], self.endpoint.released
        while size > 0:
            if self.endpoint.stall_after is not None and self.endpoint.uploaded >= self.endpoint.stall_after:
                released.wait(600)
                raise ConnectionAbortedError("stalled upload released")
            chunk = self.rfile.read(min(size, 16 * 1024))
            chunks.append(chunk)
            size -= len(chunk)
            with self.endpoint.lock:
                self.endpoint.uploaded += len(chunk)
                if self.endpoint.rate:  # the connections share one uplink: each chunk takes its turn
                    self.endpoint.uplink_free_at = max(time.monotonic(), self.endpoint.uplink_free_at)
                    self.endpoint.uplink_free_at += len(chunk) / self.endpoint.rate
                    wait = self.endpoint.uplink_free_at - time.monotonic()
            time.sleep(wait if self.endpoint.rate else 0)
        return b"".join(chunks)

    def call(self, fn: Any) -> None:
        try:
            with self.endpoint.lock:
                result = fn()
        except (b2_exception.B2Error, KeyError, AssertionError) as exc:
            return self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a test server answers, it does not hang up
            return self.reply(500, to_json({"status": 500, "code": "internal_error", "message": repr(exc)}))
        self.reply(200, to_json(result))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.endswith("/b2_authorize_account"):
            return self.authorize()
        if path.startswith("/file/"):
            return self.download(path)
        if re.fullmatch(r"/b2api/v\d+/b2_download_file_by_id", path):
            return self.download(f"{path}?{urlsplit(self.path).query}")
        self.reply(404, to_json({"status": 404, "code": "not_found", "message": path}))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        body = self.body()  # always consumed: the connection is kept alive for the next request
        if parts.path == "/_b2/faults":
            self.endpoint.set_faults(json.loads(body or b"{}"))
            return self.reply(200, b"{}")
        if parts.path in ("/upload", "/upload_part"):
            return self.upload(parts.path, parse_qs(parts.query)["u"][0], body)
        match = re.fullmatch(r"/b2api/v\d+/b2_(\w+)", parts.path)
        if match and match.group(1) == "authorize_account":
            return self.authorize()
        if not match or not hasattr(self.endpoint.sim, match.group(1)):
            return self.reply(404, to_json({"status": 404, "code": "not_found", "message": parts.path}))
        method = getattr(self.endpoint.sim, match.group(1))
        accepted = inspect.signature(method).parameters  # e.g. v3's bucketTypes is not simulated
        params = {snake(k): v for k, v in json.loads(body or b"{}").items() if snake(k) in accepted}
        token = self.headers.get("Authorization")
        self.call(lambda: self.rewrite_urls(method(self.endpoint.sim.API_URL, token, **params)))

    def authorize(self) -> None:
        scheme, _, encoded = (self.headers.get("Authorization") or "").partition(" ")
        key_id, _, key = base64.b64decode(encoded).decode().partition(":") if scheme == "Basic" else ("", "", "")

        def authorize() -> dict:
            reply = self.endpoint.sim.authorize_account(self.endpoint.sim.API_URL, key_id, key)
            storage = reply["apiInfo"]["storageApi"]
            storage.update(apiUrl=self.endpoint.base_url, downloadUrl=self.endpoint.base_url,
                           recommendedPartSize=self.endpoint.part_size)
            return reply

        self.call(authorize)

    def rewrite_urls(self, result: Any) -> Any:
        """Upload URLs point at the simulator's fake host; route them through this server. The
        upload token stays the original URL, which the simulator checks it against."""
        if isinstance(result, dict) and "uploadUrl" in result:
            route = "/upload_part" if "/part/" in result["uploadUrl"] else "/upload"
            result = {**result, "uploadUrl": f"{self.endpoint.base_url}{route}?u={quote(result['uploadUrl'], safe='')}"}
        return result

    def upload(self, route: str, upload_url: str, body: bytes) -> None:
        data = io.BytesIO(body)
        h = self.headers
        if route == "/upload":
            info = {k[len("X-Bz-Info-"):]: unquote(v) for k, v in h.items() if k.startswith("X-Bz-Info-")}
            self.call(lambda: self.endpoint.sim.upload_file(
                upload_url, h["Authorization"], unquote(h["X-Bz-File-Name"]), int(h["Content-Length"]),
                h["Content-Type"], h["X-Bz-Content-Sha1"], info, data))
        else:
            self.call(lambda: self.endpoint.sim.upload_part(
                upload_url, h["Authorization"], int(h["X-Bz-Part-Number"]), int(h["Content-Length"]),
                h["X-Bz-Content-Sha1"], data))

    def download(self, path: str) -> None:
        byte_range = None
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        if match:
            byte_range = (int(match.group(1)), int(match.group(2)))
        try:
            with self.endpoint.lock, self.endpoint.sim.download_file_from_url(
                    self.headers.get("Authorization"), self.endpoint.sim.DOWNLOAD_URL + path, byte_range) as response:
                body = response.data_bytes
        except (b2_exception.B2Error, KeyError) as exc:
            return self.fail(exc)
        headers = {k: str(v) for k, v in response.headers.items() if k.lower() not in
                   ("content-length", "content-type")}
        self.reply(206 if byte_range else 200, body, headers,
                   content_type=response.headers.get("content-type", "application/octet-stream"))


def make_handler(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (B2Handler,), {"endpoint": endpoint})


def serve(host: str, port: int, bucket: str, part_size: int) -> tuple[ThreadingHTTPServer, Endpoint]:
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    endpoint = Endpoint(f"http://{host}:{server.server_address[1]}", bucket, part_size)
    server.RequestHandlerClass = make_handler(endpoint)
    server.daemon_threads = True
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description="B2-native endpoint on RawSimulator (test infrastructure)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=16500)
    parser.add_argument("--bucket", default="opencode-memory")
    parser.add_argument("--part-size", type=int, default=100_000_000, help="recommendedPartSize in bytes")
    parser.add_argument("--info-file", help="write realm, key id, key and bucket here as JSON")
    args = parser.parse_args()
    server, endpoint = serve(args.host, args.port, args.bucket, args.part_size)
    if args.info_file:
        with open(args.info_file, "w") as out:
            json.dump(endpoint.info(), out)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
