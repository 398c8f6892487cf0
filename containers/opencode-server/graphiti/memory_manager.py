#!/usr/bin/env python3
"""Agent memory for the OpenCode pod: Graphiti on FalkorDB, with a Valkey query cache.

    store_episode(content, metadata=None) -> str     write one event into the group's graph
    query_memory(search_query, limit=5) -> str       facts relevant to a question (cached)
    get_entities(entity_type=None) -> list[dict]     every entity of the group, with its type
    health() -> dict                                 FalkorDB / Valkey reachability, LLM endpoint
    close()                                          release every client

CLI: python3 memory_manager.py store|query|entities|health ... (see --help).

Importing this module connects to nothing, reads no environment and imports none of graphiti,
openai or falkordb: the OpenCode plugin spawns it on every chat and file event, so a cached
`query` must cost little more than starting Python with redis.

Errors:
    MemoryManagerError        exit 1
    ├── UsageError            exit 2: bad argument, bad input, bad environment variable
    └── ServiceError          exit 1: a service failed; names it and its host:port
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import redis.asyncio
    from falkordb.asyncio import FalkorDB
    from graphiti_core import Graphiti

__all__ = [
    "MemoryManagerError", "UsageError", "ServiceError", "Settings",
    "store_episode", "query_memory", "get_entities", "health", "export_to_b2", "export_to_file",
    "write_export", "restore", "close", "main",
]

log = logging.getLogger("memory_manager")

# === Constants ===================================================================================

EPISODE_SOURCE = "opencode"
HEALTH_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 10.0       # Valkey commands; FalkorDB queries get GRAPH_TIMEOUT_S
GRAPH_TIMEOUT_S = 60.0
LLM_TIMEOUT_S = 60.0           # per OpenAI request; the SDK retries twice on top
LLM_MAX_COROUTINES = 8
LOCK_TTL_S = 30                # the holder renews it; a crashed holder frees the group this fast
NO_RESULTS = "No relevant memories found."
# What build_indices_and_constraints() indexes in graphiti-core 0.31 (a partial build is redone).
GRAPHITI_INDEXED_LABELS = ("Entity", "Episodic", "Community", "Saga", "RELATES_TO", "MENTIONS",
                           "HAS_MEMBER", "HAS_EPISODE", "NEXT_EPISODE")
GROUP_ID_RULE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LABEL_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# RediSearch rejects a standalone `_` token (graphiti #1820).
LONE_UNDERSCORES = re.compile(r"(?<![\w])_+(?![\w])")


# === Errors ======================================================================================

class MemoryManagerError(Exception):
    """Base of every error this module raises on purpose."""

    exit_code = 1


class UsageError(MemoryManagerError):
    """Bad argument, bad input or bad environment variable."""

    exit_code = 2


class ServiceError(MemoryManagerError):
    """A dependency failed: ServiceError("valkey", "127.0.0.1:6380", "connection refused")."""

    def __init__(self, service: str, address: str, detail: str) -> None:
        super().__init__(f"{service} at {address}: {detail}")
        self.service = service
        self.address = address


# === Configuration ===============================================================================

def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _env_str(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, "").strip() or default


def _env_url(name: str) -> str | None:
    url = _env_str(name)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{name} must be an http(s) URL, got {redact_url(url)!r}")
    return url


def _env_b2_realm() -> str:
    """A realm name b2sdk knows (production, staging, dev) or the URL of a B2-native endpoint."""
    realm = _env_str("B2_REALM", "production") or "production"
    if "://" in realm:
        return _env_url("B2_REALM") or realm
    if not re.fullmatch(r"[a-z]+", realm):
        raise UsageError(f"B2_REALM must be a realm name or an http(s) URL, got {realm!r}")
    return realm


def redact_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return parts._replace(netloc=netloc).geturl()
    return url


@dataclass(frozen=True)
class Settings:
    """Everything the module reads from the environment, read once and validated."""

    falkordb_host: str = "localhost"
    falkordb_port: int = 6379
    falkordb_username: str | None = None
    falkordb_password: str | None = field(default=None, repr=False)
    valkey_host: str = "localhost"
    valkey_port: int = 6380
    valkey_password: str | None = field(default=None, repr=False)
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    llm_model: str | None = None
    llm_small_model: str | None = None
    embedding_model: str | None = None
    group_id: str = "opencode"
    cache_ttl_s: int = 300
    max_episode_chars: int = 100_000
    lock_wait_s: int = 120
    b2_key_id: str | None = None
    b2_app_key: str | None = field(default=None, repr=False)
    b2_bucket: str | None = None
    b2_prefix: str = ""
    b2_realm: str = "production"

    @classmethod
    def from_env(cls) -> Settings:
        group_id = _env_str("MEMORY_GROUP_ID", "opencode") or "opencode"
        if not GROUP_ID_RULE.match(group_id):
            raise UsageError(f"MEMORY_GROUP_ID must match {GROUP_ID_RULE.pattern}, got {group_id!r}")
        return cls(
            falkordb_host=_env_str("FALKORDB_HOST", "localhost") or "localhost",
            falkordb_port=_env_int("FALKORDB_PORT", 6379, 1, 65535),
            falkordb_username=_env_str("FALKORDB_USERNAME"),
            falkordb_password=_env_str("FALKORDB_PASSWORD"),
            valkey_host=_env_str("VALKEY_HOST", "localhost") or "localhost",
            valkey_port=_env_int("VALKEY_PORT", 6380, 1, 65535),
            valkey_password=_env_str("VALKEY_PASSWORD"),
            openai_api_key=_env_str("OPENAI_API_KEY"),
            openai_base_url=_env_url("OPENAI_BASE_URL"),
            llm_model=_env_str("MEMORY_LLM_MODEL"),
            llm_small_model=_env_str("MEMORY_LLM_SMALL_MODEL"),
            embedding_model=_env_str("MEMORY_EMBEDDING_MODEL"),
            group_id=group_id,
            cache_ttl_s=_env_int("MEMORY_CACHE_TTL", 300, 1, 30 * 86_400),
            max_episode_chars=_env_int("MEMORY_MAX_EPISODE_CHARS", 100_000, 1, 10_000_000),
            lock_wait_s=_env_int("MEMORY_LOCK_WAIT", 120, 1, 3600),
            b2_key_id=_env_str("B2_KEY_ID"),
            b2_app_key=_env_str("B2_APP_KEY"),
            b2_bucket=_env_str("B2_BUCKET"),
            b2_prefix=(_env_str("B2_PREFIX") or "").strip("/"),
            b2_realm=_env_b2_realm(),
        )

    @property
    def falkordb_address(self) -> str:
        return f"{self.falkordb_host}:{self.falkordb_port}"

    @property
    def valkey_address(self) -> str:
        return f"{self.valkey_host}:{self.valkey_port}"

    @property
    def llm_address(self) -> str:
        return redact_url(self.openai_base_url) if self.openai_base_url else "api.openai.com"

    @property
    def b2_address(self) -> str:
        return redact_url(self.b2_realm) if "://" in self.b2_realm else f"B2 {self.b2_realm}"

    def require_b2(self, bucket_needed: bool = True) -> None:
        needed = [("B2_KEY_ID", self.b2_key_id), ("B2_APP_KEY", self.b2_app_key)]
        for name, value in needed + ([("B2_BUCKET", self.b2_bucket)] if bucket_needed else []):
            if not value:
                raise UsageError(f"{name} is not set (needed to export to B2; "
                                 "`export --output PATH` writes a local file instead)")

    def require_llm(self) -> str:
        if not self.openai_api_key:
            raise UsageError("OPENAI_API_KEY is not set (needed to store and to answer uncached queries)")
        return self.openai_api_key


# === Observability ===============================================================================
# Spans through ddtrace, imported only when tracing is on and an agent answers a quick probe:
# without an agent ddtrace holds a short CLI's exit for seconds. Metrics are DogStatsD datagrams sent
# straight over UDP (one line each); the `datadog` client would add ~200 ms of import to a cache hit.

SERVICE_NAME = "memory-manager"
METRIC_PREFIX = "opencode.memory."
AGENT_PROBE_TIMEOUT_S = 0.1
TRACE_FLUSH_TIMEOUT_S = 0.5
SECRET_VARIABLES = ("OPENAI_API_KEY", "B2_APP_KEY", "VALKEY_PASSWORD", "FALKORDB_PASSWORD")


@dataclass
class _Telemetry:
    probed: bool = False
    tracer: Any = None
    statsd: Any = None  # (socket, address) once opened


_telemetry = _Telemetry()


def secret_values() -> list[str]:
    """Secrets straight from the environment, so scrubbing works even when Settings fails."""
    return [v for v in (os.environ.get(name, "").strip() for name in SECRET_VARIABLES) if v]


def scrub(text: str) -> str:
    for secret in secret_values():
        text = text.replace(secret, "***")
    return text


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _tracing_enabled() -> bool:
    return os.environ.get("DD_TRACE_ENABLED", "true").strip().lower() not in ("false", "0", "no", "off")


def _agent_address() -> tuple[str, Any]:
    """Where ddtrace will send traces, in ddtrace's own order of precedence."""
    url = os.environ.get("DD_TRACE_AGENT_URL", "").strip()
    if url.startswith("unix://"):
        return "unix", url[len("unix://"):]
    if url:
        parts = urlsplit(url)
        return "tcp", (parts.hostname or "localhost", parts.port or 8126)
    host = os.environ.get("DD_AGENT_HOST", "").strip()
    if not host and os.path.exists("/var/run/datadog/apm.socket"):
        return "unix", "/var/run/datadog/apm.socket"
    return "tcp", (host or "localhost", int(os.environ.get("DD_TRACE_AGENT_PORT") or 8126))


async def _agent_answers() -> bool:
    kind, address = _agent_address()

    async def probe() -> bool:
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(b"GET /info HTTP/1.0\r\nHost: agent\r\n\r\n")
            return (await reader.read(8)).startswith(b"HTTP/1.")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(probe(), AGENT_PROBE_TIMEOUT_S)
    except (OSError, ValueError, asyncio.TimeoutError):
        return False


async def _tracer() -> Any:
    if not _telemetry.probed:
        _telemetry.probed = True
        if _tracing_enabled() and await _agent_answers():
            # A CLI lives for a second: no instrumentation-telemetry posts unless the user wants them.
            os.environ.setdefault("DD_INSTRUMENTATION_TELEMETRY_ENABLED", "false")
            from ddtrace.trace import tracer

            _telemetry.tracer = tracer
    return _telemetry.tracer


def _metric_tags(**tags: Any) -> list[str]:
    standard = {"service": os.environ.get("DD_SERVICE") or SERVICE_NAME,
                "env": os.environ.get("DD_ENV"), "version": os.environ.get("DD_VERSION")}
    merged = {**tags, **{k: v for k, v in standard.items() if v}}
    return [f"{k}:{str(v).replace(',', '_').replace('|', '_')}" for k, v in merged.items() if v is not None]


def _statsd_target() -> tuple[int, Any]:
    url = os.environ.get("DD_DOGSTATSD_URL", "").strip()
    if url.startswith("unix://"):
        return socket.AF_UNIX, url[len("unix://"):]
    if url.startswith("udp://"):
        parts = urlsplit(url)
        return socket.AF_INET, (parts.hostname or "localhost", parts.port or 8125)
    host = os.environ.get("DD_AGENT_HOST", "").strip() or "localhost"
    return socket.AF_INET, (host, int(os.environ.get("DD_DOGSTATSD_PORT") or 8125))


def emit(metric: str, value: float, kind: str, **tags: Any) -> None:
    """Send one DogStatsD datagram (kind: c counter, d distribution). Never raises."""
    line = f"{METRIC_PREFIX}{metric}:{value:g}|{kind}|#{','.join(_metric_tags(**tags))}"
    try:
        if _telemetry.statsd is None:
            family, address = _statsd_target()
            if family == socket.AF_INET:
                family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            _telemetry.statsd = (sock, address)
        sock, address = _telemetry.statsd
        sock.sendto(line.encode(), address)
    except (OSError, ValueError):
        pass  # metrics are best effort: no agent, no metrics


class _Span:
    """Tags for the current span; does nothing when tracing is off."""

    def __init__(self, span: Any = None) -> None:
        self.span = span

    def set(self, **tags: Any) -> None:
        if self.span is not None:
            for key, value in tags.items():
                if isinstance(value, bool):
                    self.span.set_tag(key, str(value).lower())
                elif isinstance(value, (int, float)):
                    self.span.set_metric(key, value)
                elif value is not None:
                    self.span.set_tag(key, value)


@contextlib.asynccontextmanager
async def span(name: str, **tags: Any) -> AsyncIterator[_Span]:
    """A child span (or a no-op). Errors are tagged by hand so that their messages are scrubbed."""
    tracer = await _tracer()
    if tracer is None:
        yield _Span()
        return
    current = tracer.trace(name, service=os.environ.get("DD_SERVICE") or SERVICE_NAME)
    wrapper = _Span(current)
    wrapper.set(**tags)
    try:
        yield wrapper
    except BaseException as exc:
        current.error = 1
        current.set_tag("error.type", type(exc).__name__)
        current.set_tag("error.message", scrub(str(exc))[:500])
        raise
    finally:
        current.finish()


@contextlib.asynccontextmanager
async def operation(name: str, **tags: Any) -> AsyncIterator[_Span]:
    """The root span of a public operation plus its duration and error metrics."""
    started = time.perf_counter()
    group = _group_for_tags()
    error_type = None
    try:
        async with span(f"memory.{name}", **{"memory.group": group, **tags}) as current:
            if current.span is not None:
                current.span.resource = name
            yield current
    except BaseException as exc:
        error_type = type(exc).__name__
        raise
    finally:
        metric_tags = {"operation": name, "group": group}
        emit(f"{name}.duration", round((time.perf_counter() - started) * 1000, 3), "d", **metric_tags)
        if error_type:
            emit("errors", 1, "c", error_type=error_type, **metric_tags)


def _group_for_tags() -> str | None:
    try:
        return settings().group_id
    except UsageError:
        return None


def _close_statsd() -> None:
    if _telemetry.statsd is not None:
        _telemetry.statsd[0].close()
        _telemetry.statsd = None


def shutdown_telemetry() -> None:
    """Close the DogStatsD socket and flush spans within TRACE_FLUSH_TIMEOUT_S."""
    _close_statsd()
    if _telemetry.tracer is not None:
        _telemetry.tracer.shutdown(timeout=TRACE_FLUSH_TIMEOUT_S)


# === Clients =====================================================================================
# Lazy singletons. asyncio clients are bound to the loop that created them, and a script may call
# asyncio.run() several times, so every client is recreated when the running loop changes.

@dataclass
class _Clients:
    loop: asyncio.AbstractEventLoop | None = None
    settings: Settings | None = None
    valkey: redis.asyncio.Redis | None = None
    falkordb: FalkorDB | None = None
    graphiti: Graphiti | None = None
    indexed_groups: set[str] = field(default_factory=set)
    cache_warned: bool = False
    closer: AsyncIterator[None] | None = None  # strong reference: the loop only holds a weak one


_clients = _Clients()


def settings() -> Settings:
    if _clients.settings is None:
        _clients.settings = Settings.from_env()
    return _clients.settings


def _bound_clients() -> _Clients:
    loop = asyncio.get_running_loop()
    if _clients.loop is not loop:
        # Clients of a finished loop cannot be closed any more; drop them.
        _clients.valkey = _clients.falkordb = _clients.graphiti = None
        _clients.indexed_groups.clear()
        _clients.loop = loop
        _clients.closer = _close_when_loop_ends()
    return _clients


def _close_when_loop_ends() -> AsyncIterator[None]:
    """Release the clients on their own loop when asyncio.run() finishes, even if the caller never
    awaits close(): the loop finalises its async generators (shutdown_asyncgens) before closing."""

    async def closer() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await close()

    generator = closer()
    with contextlib.suppress(StopIteration):
        generator.asend(None).send(None)  # registers it with the running loop, parks it at `yield`
    return generator


def _valkey() -> redis.asyncio.Redis:
    clients = _bound_clients()
    if clients.valkey is None:
        import redis.asyncio
        from redis.driver_info import DriverInfo

        s = settings()
        # RESP2 and no CLIENT SETINFO: the first command on a fresh client is then one round trip.
        clients.valkey = redis.asyncio.Redis(
            host=s.valkey_host, port=s.valkey_port, password=s.valkey_password,
            socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
            protocol=2, driver_info=DriverInfo(name=None, lib_version=None), decode_responses=True,
        )
    return clients.valkey


async def _falkordb() -> FalkorDB:
    clients = _bound_clients()
    if clients.falkordb is None:
        s = settings()
        async with _service("falkordb", s.falkordb_address):
            # FalkorDB() probes for cluster mode with a blocking client: keep that off the loop.
            clients.falkordb = await asyncio.to_thread(_new_falkordb, s)
    return clients.falkordb


def _new_falkordb(s: Settings) -> FalkorDB:
    from falkordb.asyncio import FalkorDB

    return FalkorDB(host=s.falkordb_host, port=s.falkordb_port, username=s.falkordb_username,
                    password=s.falkordb_password, socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=GRAPH_TIMEOUT_S)


async def _group_driver(group: str) -> Any:
    """A graphiti FalkorDriver bound to one group's graph, sharing the FalkorDB pool; built off the
    loop for the reason given in _graphiti()."""
    from graphiti_core.driver.falkordb_driver import FalkorDriver

    falkordb = await _falkordb()
    return await asyncio.to_thread(lambda: FalkorDriver(falkor_db=falkordb, database=group))


def _entity_types() -> dict[str, type]:
    """Entity types for coding-agent memory. The docstrings are the LLM's classification guide;
    the models have no fields, so typing a node costs no extra LLM call."""
    from pydantic import BaseModel

    class File(BaseModel):
        """A file or directory path in a code repository, e.g. src/app/main.py."""

    class CodeSymbol(BaseModel):
        """A named function, class, method, variable, command or module in source code."""

    class Error(BaseModel):
        """A named error, exception type or failure, e.g. TimeoutError or a failing test."""

    class Technology(BaseModel):
        """A named library, framework, service, database, tool, language or product."""

    class Person(BaseModel):
        """A human: a user, a developer or a reviewer, named or identified by handle."""

    return {cls.__name__: cls for cls in (File, CodeSymbol, Error, Technology, Person)}


async def _graphiti() -> Graphiti:
    clients = _bound_clients()
    if clients.graphiti is None:
        s = settings()
        s.require_llm()
        falkordb = await _falkordb()
        # Built off the loop: FalkorDriver() inside a running loop schedules an index build on every
        # process start. _ensure_indices() builds them once per graph instead.
        clients.graphiti = await asyncio.to_thread(_new_graphiti, s, falkordb)
    return clients.graphiti


def _new_graphiti(s: Settings, falkordb: FalkorDB) -> Graphiti:
    api_key = s.openai_api_key  # checked by _graphiti() before any connection
    os.environ.setdefault("GRAPHITI_TELEMETRY_ENABLED", "false")
    from graphiti_core import Graphiti
    from graphiti_core.cross_encoder.openai_reranker_client import OpenAIRerankerClient
    from graphiti_core.driver.falkordb_driver import FalkorDriver
    from graphiti_core.embedder.openai import OpenAIEmbedder, OpenAIEmbedderConfig
    from graphiti_core.llm_client import LLMConfig, OpenAIClient
    from openai import AsyncOpenAI

    openai = AsyncOpenAI(api_key=api_key, base_url=s.openai_base_url, timeout=LLM_TIMEOUT_S)
    llm_config = LLMConfig(api_key=api_key, base_url=s.openai_base_url,
                           model=s.llm_model, small_model=s.llm_small_model)
    embedder_config = OpenAIEmbedderConfig(api_key=api_key, base_url=s.openai_base_url)
    if s.embedding_model:
        embedder_config.embedding_model = s.embedding_model
    # A driver bound to the group: graph == group, so graphiti makes no per-call clones.
    driver = FalkorDriver(falkor_db=falkordb, database=s.group_id)
    return Graphiti(
        graph_driver=driver,
        llm_client=OpenAIClient(config=llm_config, client=openai),
        embedder=OpenAIEmbedder(config=embedder_config, client=openai),
        # Never called: RRF search makes no reranker calls. Passed so Graphiti builds no default.
        cross_encoder=OpenAIRerankerClient(config=llm_config, client=openai),
        max_coroutines=LLM_MAX_COROUTINES,
    )


async def close() -> None:
    """Release every client. Idempotent; the next call re-reads the environment."""
    clients = _clients
    same_loop = clients.loop is not None and clients.loop is _running_loop()
    if same_loop:
        if clients.valkey is not None:
            await clients.valkey.aclose()
        if clients.graphiti is not None:
            # Graphiti.close() would also close the shared FalkorDB pool; close the parts ourselves.
            await clients.graphiti.llm_client.client.close()
        if clients.falkordb is not None:
            await clients.falkordb.aclose()
    clients.valkey = clients.falkordb = clients.graphiti = clients.closer = None
    clients.indexed_groups.clear()
    _close_statsd()
    clients.loop = clients.settings = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError, TimeoutError

    return (ConnectionError, TimeoutError, OSError, asyncio.TimeoutError)


@contextlib.asynccontextmanager
async def _service(name: str, address: str) -> AsyncIterator[None]:
    """Turn a connection failure inside the block into ServiceError(name, address)."""
    try:
        yield
    except _connection_errors() as exc:
        raise ServiceError(name, address, _describe(exc)) from exc


@contextlib.asynccontextmanager
async def _llm_service() -> AsyncIterator[None]:
    import openai
    from graphiti_core.llm_client.errors import RateLimitError

    s = settings()
    try:
        yield
    except openai.AuthenticationError as exc:
        raise ServiceError("openai", s.llm_address, "authentication failed (check OPENAI_API_KEY)") from exc
    except (openai.RateLimitError, RateLimitError) as exc:
        raise ServiceError("openai", s.llm_address, "rate limited; retry later") from exc
    except openai.APIStatusError as exc:
        raise ServiceError("openai", s.llm_address, f"HTTP {exc.status_code}") from exc
    except openai.APIConnectionError as exc:
        raise ServiceError("openai", s.llm_address, _describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


# === Cache =======================================================================================
# Keys live under memory:<group>:. Each group has a generation counter that is part of every cache
# key, so a store invalidates all of the group's cached answers with one INCR (no SCAN).

def _gen_key(group: str) -> str:
    return f"memory:{group}:gen"


def _lock_key(group: str) -> str:
    return f"memory:{group}:lock"


def normalise_query(text: str) -> str:
    return " ".join(text.split()).casefold()


def cache_key(group: str, generation: str, query: str, limit: int) -> str:
    payload = json.dumps([group, generation, normalise_query(query), limit])
    return f"memory:{group}:query:{hashlib.sha256(payload.encode()).hexdigest()}"


async def _cache_lookup(group: str, query: str, limit: int) -> tuple[str | None, str | None]:
    """(cached answer or None, key to store a fresh answer under). (None, None): cache is down."""
    s = settings()
    try:
        async with _service("valkey", s.valkey_address):
            valkey = _valkey()
            generation = await valkey.get(_gen_key(group)) or "0"
            key = cache_key(group, generation, query, limit)
            return await valkey.get(key), key
    except ServiceError as exc:
        _warn_cache_down(exc)
        return None, None


async def _cache_store(key: str, answer: str) -> None:
    s = settings()
    try:
        async with _service("valkey", s.valkey_address):
            await _valkey().set(key, answer, ex=s.cache_ttl_s)
    except ServiceError as exc:
        _warn_cache_down(exc)


async def _invalidate(group: str) -> None:
    s = settings()
    try:
        async with _service("valkey", s.valkey_address):
            await _valkey().incr(_gen_key(group))
    except ServiceError as exc:
        _warn_cache_down(exc)


def _warn_cache_down(exc: ServiceError) -> None:
    emit("cache_unavailable", 1, "c", group=_group_for_tags())
    if not _clients.cache_warned:
        _clients.cache_warned = True
        log.warning("warning: cache unavailable (%s); answering without it", exc)


@contextlib.asynccontextmanager
async def _group_write_lock(group: str) -> AsyncIterator[None]:
    """Serialise writes to one group across processes (concurrent add_episode duplicates entities).

    The lock expires after LOCK_TTL_S unless renewed, so a crashed writer blocks others briefly;
    a live writer renews it in the background. Without Valkey, the write goes ahead unlocked.
    """
    s = settings()
    try:
        async with _service("valkey", s.valkey_address):
            lock = _valkey().lock(_lock_key(group), timeout=LOCK_TTL_S,
                                  blocking_timeout=s.lock_wait_s, sleep=0.05)
            async with span("memory.lock.acquire") as waiting:
                acquired = await lock.acquire()
                waiting.set(**{"lock.acquired": bool(acquired)})
    except ServiceError as exc:
        _warn_cache_down(exc)
        yield
        return
    if not acquired:
        raise ServiceError("valkey", s.valkey_address,
                           f"write lock for group {group!r} not free within {s.lock_wait_s} s "
                           "(another store is still running; raise MEMORY_LOCK_WAIT)")
    renewer = asyncio.create_task(_renew(lock))
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        with contextlib.suppress(Exception):  # it expires by itself if Valkey went away
            await lock.release()


async def _renew(lock: Any) -> None:
    while True:
        await asyncio.sleep(LOCK_TTL_S / 3)
        with contextlib.suppress(*_connection_errors()):
            await lock.reacquire()


# === Operations ==================================================================================

def _validate_content(content: Any, limit: int) -> str:
    if not isinstance(content, str) or not content.strip():
        raise UsageError("content must be non-empty text")
    if len(content) > limit:
        raise UsageError(f"content is {len(content)} characters; MEMORY_MAX_EPISODE_CHARS allows {limit}")
    return content


def _validate_metadata(metadata: Any) -> dict | None:
    if metadata is None:
        return None
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise UsageError(f"metadata is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(metadata, dict):
        raise UsageError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    return metadata


def _validate_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 50:
        raise UsageError(f"limit must be an integer from 1 to 50, got {limit!r}")
    return limit


def _validate_entity_type(entity_type: Any) -> str | None:
    if entity_type is None:
        return None
    if not isinstance(entity_type, str) or not LABEL_RULE.match(entity_type):
        raise UsageError(f"entity type must match {LABEL_RULE.pattern}, got {entity_type!r}")
    return entity_type


def episode_name(now: datetime) -> str:
    return "episode_" + now.strftime("%Y%m%dT%H%M%S%fZ")


async def _graph_exists(group: str) -> bool:
    s = settings()
    async with _service("falkordb", s.falkordb_address):
        return bool(await (await _falkordb()).connection.exists(group))


async def _ensure_indices(group: str) -> None:
    """Build graphiti's indexes once per graph: skipped when the graph already has them."""
    if group in _clients.indexed_groups:
        return
    graph = (await _falkordb()).select_graph(group)
    if await _graph_exists(group):
        result = await graph.ro_query(
            "CALL db.indexes() YIELD label WHERE label IN $labels RETURN count(DISTINCT label)",
            {"labels": list(GRAPHITI_INDEXED_LABELS)})
        if result.result_set[0][0] == len(GRAPHITI_INDEXED_LABELS):
            _clients.indexed_groups.add(group)
            return
    driver = await _group_driver(group)
    await driver.build_indices_and_constraints()
    _clients.indexed_groups.add(group)


async def store_episode(content: str, metadata: dict | str | None = None) -> str:
    """Store one OpenCode event as an episode of the group's graph; returns the episode name."""
    async with operation("store") as op:
        return await _store(op, content, metadata)


async def _store(op: _Span, content: str, metadata: dict | str | None) -> str:
    s = settings()
    content = _validate_content(content, s.max_episode_chars)
    metadata = _validate_metadata(metadata)
    op.set(**{"memory.content.length": len(content), "memory.content.hash": short_hash(content),
              "memory.metadata.keys": len(metadata or {})})
    graphiti = await _graphiti()
    from graphiti_core.nodes import EpisodeType

    async with _group_write_lock(s.group_id):
        now = datetime.now(timezone.utc)
        name = episode_name(now)
        async with _service("falkordb", s.falkordb_address), _llm_service():
            await _ensure_indices(s.group_id)
            async with span("memory.graph.add_episode") as add:
                result = await graphiti.add_episode(
                    name=name, episode_body=content, source_description=EPISODE_SOURCE,
                    reference_time=now, source=EpisodeType.text, group_id=s.group_id,
                    entity_types=_entity_types(),
                )
                add.set(**{"memory.entities": len(result.nodes), "memory.facts": len(result.edges)})
            if metadata is not None:
                await graphiti.driver.execute_query(
                    "MATCH (e:Episodic {uuid: $uuid}) SET e.metadata = $metadata",
                    uuid=result.episode.uuid, metadata=json.dumps(metadata, sort_keys=True),
                )
        async with span("memory.cache.invalidate"):
            await _invalidate(s.group_id)
    op.set(**{"memory.episode": name})
    return name


def format_facts(edges: list[Any]) -> str:
    if not edges:
        return NO_RESULTS
    lines: dict[str, None] = {}  # ordered set: two edges may carry the same fact text
    for edge in edges:
        valid = edge.valid_at.isoformat() if edge.valid_at else "?"
        invalid = edge.invalid_at.isoformat() if edge.invalid_at else "present"
        lines[f"- {edge.fact} (valid {valid} → {invalid})"] = None
    return "\n".join(lines)


async def _search(query: str, limit: int) -> str:
    s = settings()
    if not await _graph_exists(s.group_id):  # searching would create an empty graph
        return NO_RESULTS
    graphiti = await _graphiti()
    from graphiti_core.search.search_config_recipes import EDGE_HYBRID_SEARCH_RRF

    config = EDGE_HYBRID_SEARCH_RRF.model_copy(deep=True)
    config.limit = limit
    async with _service("falkordb", s.falkordb_address), _llm_service():
        results = await graphiti.search_(LONE_UNDERSCORES.sub(" ", query), config=config,
                                         group_ids=[s.group_id])
    return format_facts(_ranked(results.edges, results.edge_reranker_scores))


def _ranked(edges: list[Any], scores: list[float]) -> list[Any]:
    """Graphiti's order, with RRF ties (common: rank 1+2 equals rank 2+1) broken newest first, then
    by uuid, instead of by FalkorDB's internal ids, which a restore renumbers."""
    if len(scores) != len(edges):
        return edges

    def key(pair: tuple[Any, float]) -> tuple:
        edge, score = pair
        when = edge.valid_at or edge.created_at
        return (-score, -when.timestamp() if when else 0.0, edge.uuid)

    return [edge for edge, _ in sorted(zip(edges, scores), key=key)]


async def query_memory(search_query: str, limit: int = 5) -> str:
    """Facts relevant to the query, one per line with their validity window; cached per group."""
    async with operation("query") as op:
        if not isinstance(search_query, str) or not search_query.strip():
            raise UsageError("query must be non-empty text")
        limit = _validate_limit(limit)
        group = settings().group_id
        op.set(**{"memory.limit": limit, "memory.query.length": len(search_query),
                  "memory.query.hash": short_hash(normalise_query(search_query))})
        async with span("memory.cache.lookup") as lookup:
            cached, key = await _cache_lookup(group, search_query, limit)
            lookup.set(**{"cache.hit": cached is not None})
        op.set(**{"cache.hit": cached is not None})
        if cached is not None:
            emit("cache_hit", 1, "c", operation="query", group=group)
            answer = cached
        else:
            if key is not None:
                emit("cache_miss", 1, "c", operation="query", group=group)
            async with span("memory.graph.search") as search:
                answer = await _search(search_query, limit)
                search.set(**{"memory.results": _fact_count(answer)})
            if key is not None:
                async with span("memory.cache.write"):
                    await _cache_store(key, answer)
        op.set(**{"memory.results": _fact_count(answer)})
        return answer


def _fact_count(answer: str) -> int:
    return 0 if answer == NO_RESULTS else len(answer.splitlines())


async def get_entities(entity_type: str | None = None) -> list[dict]:
    """{"name", "type"} for every entity of the group, sorted by name; type is the most specific
    label. The filter is validated and passed as a query parameter, never pasted into Cypher."""
    async with operation("entities") as op:
        entity_type = _validate_entity_type(entity_type)
        op.set(**{"memory.entity_type": entity_type})
        s = settings()
        if not await _graph_exists(s.group_id):
            op.set(**{"memory.results": 0})
            return []
        async with _service("falkordb", s.falkordb_address):
            result = await (await _falkordb()).select_graph(s.group_id).ro_query(
                "MATCH (n:Entity) WHERE $type IS NULL OR $type IN labels(n) "
                "RETURN n.name, labels(n) ORDER BY toLower(n.name), n.name, n.uuid",
                {"type": entity_type},
            )
        op.set(**{"memory.results": len(result.result_set)})
        return [{"name": name, "type": _specific_label(labels)} for name, labels in result.result_set]


def _specific_label(labels: list[str]) -> str:
    specific = sorted(label for label in labels if label != "Entity")
    return specific[0] if specific else "Entity"


async def health() -> dict:
    """Reachability of FalkorDB and Valkey (bounded to about a second) and the LLM endpoint."""
    async with operation("health") as op:
        s = settings()
        falkordb, valkey = await asyncio.gather(
            _probe(s.falkordb_address, _falkordb_probe), _probe(s.valkey_address, _valkey_probe))
        op.set(**{"health.falkordb": falkordb["ok"], "health.valkey": valkey["ok"],
                  "health.llm_configured": bool(s.openai_api_key)})
        return {
            "falkordb": falkordb,
            "valkey": valkey,
            "llm": {"ok": bool(s.openai_api_key), "address": s.llm_address,
                    "detail": "configured" if s.openai_api_key else "OPENAI_API_KEY not set"},
        }


async def _probe(address: str, check: Callable[[], Any]) -> dict:
    try:
        detail = await asyncio.wait_for(check(), HEALTH_TIMEOUT_S)
        return {"ok": True, "address": address, "detail": detail}
    except (asyncio.TimeoutError, TimeoutError):
        return {"ok": False, "address": address, "detail": f"no answer within {HEALTH_TIMEOUT_S:g} s"}
    except _connection_errors() as exc:
        return {"ok": False, "address": address, "detail": _describe(exc)}
    except Exception as exc:  # noqa: BLE001 - any other server reply still means "not healthy"
        return {"ok": False, "address": address, "detail": f"{type(exc).__name__}: {_describe(exc)}"}


async def _falkordb_probe() -> str:
    import redis.asyncio

    s = settings()
    # A throwaway client with the probe's own timeout: a black-holed server cannot hold it longer.
    probe = redis.asyncio.Redis(host=s.falkordb_host, port=s.falkordb_port, username=s.falkordb_username,
                                password=s.falkordb_password, socket_timeout=HEALTH_TIMEOUT_S,
                                socket_connect_timeout=HEALTH_TIMEOUT_S, protocol=2)
    try:
        graphs = await probe.execute_command("GRAPH.LIST")
    finally:
        await probe.aclose()
    return f"{len(graphs)} graph(s)"


async def _valkey_probe() -> str:
    info = await _valkey().info("server")
    name = info.get("server_name", "redis")
    return f"{name} {info.get('valkey_version') or info.get('redis_version', '?')}"


# === Export and restore ==========================================================================
# The document is one JSON object, written one record per line so that both directions stream:
#
#   {"format": "opencode-memory-export", "version": 1, ..., "groups": [
#   {"group_id": "g1", "nodes": [
#   {node}
#   ,{node}
#   ], "edges": [
#   {edge}
#   ], "counts": {"nodes": 2, "edges": 1}}
#   ,{"group_id": "g2", "nodes": [
#   ...
#   ], "counts": {"groups": 2, "nodes": ..., "edges": ...}}
#
# Vectors are base64 of little-endian float32 (exact, and about 20x cheaper than float text).
# Schema: containers/opencode-server/graphiti/export.schema.json.

EXPORT_FORMAT = "opencode-memory-export"
EXPORT_VERSION = 1
EXPORT_PAGE_ROWS = 500
RESTORE_BATCH_ROWS = 200
NODE_LABELS = ("Episodic", "Entity", "Community", "Saga")
EDGE_TYPES = ("RELATES_TO", "MENTIONS", "HAS_MEMBER", "HAS_EPISODE", "NEXT_EPISODE")
EMBEDDING_KEYS = ("name_embedding", "fact_embedding")
B2_CONNECT_TIMEOUT_S = 3.0
B2_READ_TIMEOUT_S = 20.0
B2_DEADLINE_S = 45.0           # b2sdk retries for minutes on its own; the backup timer must not
NODE_PAGE = ("MATCH (n:{label}) WHERE n.uuid > $after "
             "RETURN n.uuid, labels(n), properties(n) ORDER BY n.uuid LIMIT $limit")
EDGE_PAGE = ("MATCH (a)-[e:{type}]->(b) WHERE e.uuid > $after "
             "RETURN e.uuid, a.uuid, b.uuid, [l IN labels(a) WHERE l IN $primary][0], "
             "[l IN labels(b) WHERE l IN $primary][0], properties(e) ORDER BY e.uuid LIMIT $limit")

Progress = Callable[[int, int], None]


def encode_vector(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def decode_vector(text: str) -> list[float]:
    raw = base64.b64decode(text, validate=True)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _split_embeddings(props: dict) -> tuple[dict, dict]:
    props = dict(props)
    return props, {k: encode_vector(props.pop(k)) for k in EMBEDDING_KEYS if props.get(k) is not None}


@dataclass
class ExportSummary:
    groups: int = 0
    nodes: int = 0
    edges: int = 0
    bytes: int = 0
    sha256: str = ""


class _DocumentWriter:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.bytes = 0

    async def lines(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        self.digest.update(data)
        self.bytes += len(data)
        await asyncio.to_thread(self.out.write, data)


async def _memory_groups() -> list[str]:
    s = settings()
    async with _service("falkordb", s.falkordb_address):
        graphs = await (await _falkordb()).list_graphs()
    return sorted(g for g in graphs if GROUP_ID_RULE.match(g))


async def _pages(group: str, query: str, **params: Any) -> AsyncIterator[list[list]]:
    """Keyset pagination on uuid: stable and linear, unlike SKIP."""
    graph = (await _falkordb()).select_graph(group)
    after = ""
    while True:
        rows = (await graph.ro_query(query, {**params, "after": after, "limit": EXPORT_PAGE_ROWS})).result_set
        if rows:
            yield rows
        if len(rows) < EXPORT_PAGE_ROWS:
            return
        after = rows[-1][0]


def _node_record(row: list) -> dict:
    uuid, labels, props = row
    props, embeddings = _split_embeddings(props)
    return {"uuid": uuid, "labels": labels, "properties": props, "embeddings": embeddings}


def _edge_record(edge_type: str, row: list) -> dict:
    uuid, source, target, source_label, target_label, props = row
    props, embeddings = _split_embeddings(props)
    return {"uuid": uuid, "type": edge_type, "source": source, "target": target, "source_label": source_label,
            "target_label": target_label, "properties": props, "embeddings": embeddings}


async def _export_group(group: str, writer: _DocumentWriter, first: bool, summary: ExportSummary,
                        progress: Progress | None) -> None:
    opening = json.dumps({"group_id": group})[:-1] + ', "nodes": ['
    await writer.lines([("" if first else ",") + opening])
    sections = {
        "nodes": [(NODE_PAGE.format(label=label), {}, _node_record) for label in NODE_LABELS],
        "edges": [(EDGE_PAGE.format(type=edge_type), {"primary": list(NODE_LABELS)},
                   functools.partial(_edge_record, edge_type)) for edge_type in EDGE_TYPES],
    }
    counts = {"nodes": 0, "edges": 0}
    for kind, queries in sections.items():
        if kind == "edges":
            await writer.lines(['], "edges": ['])
        for query, params, to_record in queries:
            async for rows in _pages(group, query, **params):
                records = [json.dumps(to_record(row)) for row in rows]
                await writer.lines([("," if counts[kind] or i else "") + r for i, r in enumerate(records)])
                counts[kind] += len(records)
                setattr(summary, kind, getattr(summary, kind) + len(records))
                if progress:
                    progress(summary.nodes, summary.edges)
    await writer.lines([f'], "counts": {json.dumps(counts)}}}'])


def _embedding_dimension() -> int:
    from graphiti_core.embedder.client import EMBEDDING_DIM

    return EMBEDDING_DIM


async def write_export(out: Any, progress: Progress | None = None) -> ExportSummary:
    """Stream every memory group to `out` (a binary file object) as one export document."""
    async with span("memory.export.stream") as stream:
        summary = await _write_export(out, progress)
        stream.set(**{"memory.groups": summary.groups, "memory.nodes": summary.nodes,
                      "memory.edges": summary.edges, "memory.bytes": summary.bytes})
    return summary


async def _write_export(out: Any, progress: Progress | None) -> ExportSummary:
    from importlib.metadata import version

    s = settings()
    summary = ExportSummary()
    writer = _DocumentWriter(out)
    groups = await _memory_groups()
    header = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "graphiti_core_version": version("graphiti-core"),
        "embedding_dimension": await asyncio.to_thread(_embedding_dimension),
        "embedding_encoding": "base64-float32-le",
    }
    await writer.lines([json.dumps(header)[:-1] + ', "groups": ['])
    async with _service("falkordb", s.falkordb_address):
        for i, group in enumerate(groups):
            await _export_group(group, writer, i == 0, summary, progress)
    summary.groups = len(groups)
    totals = {"groups": summary.groups, "nodes": summary.nodes, "edges": summary.edges}
    await writer.lines([f'], "counts": {json.dumps(totals)}}}'])
    summary.bytes, summary.sha256 = writer.bytes, writer.digest.hexdigest()
    return summary


def export_file_name(now: datetime, prefix: str = "") -> str:
    name = "graphiti_export_" + now.strftime("%Y%m%dT%H%M%SZ") + ".json"
    return f"{prefix}/{name}" if prefix else name


async def export_to_file(path: str, progress: Progress | None = None) -> str:
    """Write the export document to `path` atomically (a temporary file renamed into place), or to
    stdout when `path` is "-"; returns a summary."""
    async with operation("export", **{"export.target": "stdout" if path == "-" else "file"}) as op:
        if path == "-":
            summary = await write_export(sys.stdout.buffer, progress)
            sys.stdout.flush()
        else:
            summary = await _export_to_path(path, progress)
        _record_export(op, summary)
    return f"exported {_describe_summary(summary)} to {'stdout' if path == '-' else path}"


async def _export_to_path(path: str, progress: Progress | None) -> ExportSummary:
    target = os.path.abspath(path)
    fd, temporary = tempfile.mkstemp(prefix=".graphiti_export_", suffix=".partial",
                                     dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as out:
            summary = await write_export(out, progress)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return summary


def _record_export(op: _Span, summary: ExportSummary) -> None:
    op.set(**{"memory.groups": summary.groups, "memory.nodes": summary.nodes,
              "memory.edges": summary.edges, "memory.bytes": summary.bytes})
    emit("export.bytes", summary.bytes, "d", operation="export")


def _describe_summary(summary: ExportSummary) -> str:
    return (f"{summary.groups} group(s), {summary.nodes} nodes, {summary.edges} edges, "
            f"{summary.bytes} bytes, sha256 {summary.sha256}")


async def export_to_b2(progress: Progress | None = None) -> str:
    """Export every memory group to B2 as graphiti_export_<UTC timestamp>.json; returns a summary."""
    async with operation("export", **{"export.target": "b2"}) as op:
        s = settings()
        s.require_b2()
        name = export_file_name(datetime.now(timezone.utc), s.b2_prefix)
        fd, temporary = tempfile.mkstemp(prefix="graphiti_export_", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                summary = await write_export(out, progress)
            file_info = {"sha256": summary.sha256, "format": EXPORT_FORMAT,
                         "format_version": str(EXPORT_VERSION), "groups": str(summary.groups),
                         "nodes": str(summary.nodes), "edges": str(summary.edges)}
            async with span("memory.b2.upload", **{"memory.bytes": summary.bytes}):
                await _b2(lambda api: api.get_bucket_by_name(s.b2_bucket).upload_local_file(
                    temporary, name, content_type="application/json", file_info=file_info))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _record_export(op, summary)
    return f"exported {_describe_summary(summary)} to b2://{s.b2_bucket}/{name} (file {name.rsplit('/', 1)[-1]})"


# --- B2 ------------------------------------------------------------------------------------------

def _b2_api(s: Settings) -> Any:
    """An authorised B2Api whose every HTTP request has short timeouts."""
    import requests
    from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo

    class BoundedSession(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = (B2_CONNECT_TIMEOUT_S, B2_READ_TIMEOUT_S)
            return super().request(*args, **kwargs)

    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(http_session_factory=BoundedSession))
    api.authorize_account(s.b2_realm, s.b2_key_id, s.b2_app_key)
    return api


def _b2_call(s: Settings, work: Callable[[Any], Any]) -> Any:
    from b2sdk.v2 import exception as b2

    try:
        return work(_b2_api(s))
    except (b2.InvalidAuthToken, b2.Unauthorized) as exc:
        raise ServiceError("b2", s.b2_address, "authorization failed (check B2_KEY_ID and B2_APP_KEY)") from exc
    except b2.NonExistentBucket as exc:
        raise ServiceError("b2", s.b2_address, f"bucket {s.b2_bucket!r} does not exist or the key cannot see it") from exc
    except b2.FileNotPresent as exc:
        raise ServiceError("b2", s.b2_address, "file not found") from exc
    except b2.B2ConnectionError as exc:
        raise ServiceError("b2", s.b2_address, "cannot connect") from exc
    except b2.B2RequestTimeout as exc:
        raise ServiceError("b2", s.b2_address, "request timed out") from exc
    except b2.B2Error as exc:
        raise ServiceError("b2", s.b2_address, f"{type(exc).__name__}: {_describe(exc)}") from exc


async def _b2(work: Callable[[Any], Any]) -> Any:
    """Run blocking b2sdk work in a daemon thread under a hard deadline: b2sdk's own retries can
    outlast any timeout we give its HTTP session, and a daemon thread cannot hold the process."""
    s = settings()
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error else done.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (_b2_call(s, work), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop may be gone after the deadline
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="b2", daemon=True).start()
    try:
        return await asyncio.wait_for(done, B2_DEADLINE_S)
    except asyncio.TimeoutError:
        raise ServiceError("b2", s.b2_address, f"no answer within {B2_DEADLINE_S:g} s") from None


# --- restore -------------------------------------------------------------------------------------

@dataclass
class RestorePlan:
    header: dict
    groups: dict[str, dict[str, int]]  # group -> {"nodes": n, "edges": m}


class _Corrupt(UsageError):
    def __init__(self, line: int, why: str) -> None:
        where = f" (line {line})" if line else ""
        super().__init__(f"not a valid export document{where}: {why}")


def _read_document(path: str, dimension: int | None) -> Any:
    """Yield ("header", dict), ("group", id), ("node"|"edge", record), ("end", counts) from an
    export document, checking its layout, counts and vectors as it goes (raises _Corrupt)."""
    with open(path, "rb") as source:
        lines = enumerate(source, start=1)
        number, first = next(lines, (1, b""))
        header = _parse_header(number, first, dimension)
        yield "header", header
        totals = {"groups": 0, "nodes": 0, "edges": 0}
        for number, raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith('], "counts": '):
                if _parse(number, "{" + line[3:]).get("counts") != totals:
                    raise _Corrupt(number, "the totals do not match the records")
                if next(lines, None) is not None:
                    raise _Corrupt(number + 1, "data after the end of the document")
                yield "end", totals
                return
            group = _parse(number, line.lstrip(",") + "]}")
            if not isinstance(group.get("group_id"), str) or not GROUP_ID_RULE.match(group["group_id"]):
                raise _Corrupt(number, "expected a group with a valid group_id")
            totals["groups"] += 1
            yield "group", group["group_id"]
            counts = yield from _read_group(lines, dimension, totals)
            yield "group_end", counts
    raise _Corrupt(number, "the document ends early (truncated)")


def _read_group(lines: Any, dimension: int | None, totals: dict) -> Any:
    counts = {"nodes": 0, "edges": 0}
    kind = "nodes"
    for number, raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line == '], "edges": [' and kind == "nodes":
            kind = "edges"
            continue
        if line.startswith('], "counts": ') and kind == "edges":
            if _parse(number, "{" + line[3:]).get("counts") != counts:
                raise _Corrupt(number, "the group's counts do not match its records")
            return counts
        record = _parse(number, line.removeprefix(","))
        _check_record(number, record, kind, dimension)
        counts[kind] += 1
        totals[kind] += 1
        yield kind[:-1], record
    raise _Corrupt(0, "the document ends early (truncated)")


def _parse(number: int, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise _Corrupt(number, "malformed JSON") from None
    if not isinstance(value, dict):
        raise _Corrupt(number, "expected a JSON object")
    return value


def _parse_header(number: int, raw: bytes, dimension: int | None) -> dict:
    header = _parse(number, raw.decode("utf-8", "replace").rstrip("\n") + "]}")
    if header.get("format") != EXPORT_FORMAT:
        raise UsageError(f"not an export document: format is {header.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if header.get("version") != EXPORT_VERSION:
        raise UsageError(f"unsupported export version {header.get('version')!r} (this version reads {EXPORT_VERSION})")
    if dimension is not None and header.get("embedding_dimension") != dimension:
        raise UsageError(f"embedding dimension {header.get('embedding_dimension')!r} in the export does not "
                         f"match this installation's {dimension} (EMBEDDING_DIM)")
    return header


def _check_record(number: int, record: dict, kind: str, dimension: int | None) -> None:
    required = ("uuid", "labels", "properties") if kind == "nodes" else (
        "uuid", "type", "source", "target", "source_label", "target_label", "properties")
    if any(key not in record for key in required) or not isinstance(record["properties"], dict):
        raise _Corrupt(number, f"a {kind[:-1]} record lacks {', '.join(required)}")
    labels = record["labels"] if kind == "nodes" else [record["type"], record["source_label"], record["target_label"]]
    if not all(isinstance(label, str) and LABEL_RULE.match(label) for label in labels):
        raise _Corrupt(number, "invalid label or relationship type")
    for vector in record.get("embeddings", {}).values():
        try:
            length = len(decode_vector(vector))
        except (ValueError, TypeError, struct.error):
            raise _Corrupt(number, "an embedding is not base64 float32") from None
        if dimension is not None and length != dimension:
            raise UsageError(f"line {number}: an embedding has {length} dimensions, this installation uses {dimension}")


def validate_document(path: str, dimension: int | None) -> RestorePlan:
    """First pass over a document: everything is checked before anything is written."""
    header: dict = {}
    groups: dict[str, dict[str, int]] = {}
    current = ""
    for event, value in _read_document(path, dimension):
        if event == "header":
            header = value
        elif event == "group":
            if value in groups:
                raise UsageError(f"group {value!r} appears twice in the document")
            current = value
        elif event == "group_end":
            groups[current] = value
    return RestorePlan(header, groups)


def _node_query(primary: str, extras: tuple[str, ...]) -> str:
    add_labels = f" SET n:{':'.join(extras)}" if extras else ""
    # SET n = props stores vectors as plain lists, which break cosine search: vecf32() them.
    return (f"UNWIND $rows AS row MERGE (n:{primary} {{uuid: row.uuid}}) SET n = row.props{add_labels} "
            "WITH n, row WHERE row.vector IS NOT NULL SET n.name_embedding = vecf32(row.vector)")


def _edge_query(edge_type: str, source: str, target: str) -> str:
    return (f"UNWIND $rows AS row MATCH (a:{source} {{uuid: row.source}}) MATCH (b:{target} {{uuid: row.target}}) "
            f"MERGE (a)-[e:{edge_type} {{uuid: row.uuid}}]->(b) SET e = row.props "
            "WITH e, row WHERE row.vector IS NOT NULL SET e.fact_embedding = vecf32(row.vector)")


class _Restorer:
    """Second pass: batches of UNWIND ... MERGE by uuid per group and label set (idempotent)."""

    def __init__(self, progress: Progress | None) -> None:
        self.pending: dict[tuple, list[dict]] = defaultdict(list)
        self.progress = progress
        self.nodes = self.edges = 0

    async def add_node(self, group: str, record: dict) -> None:
        primary = next((label for label in record["labels"] if label in NODE_LABELS), record["labels"][0])
        extras = tuple(sorted(label for label in record["labels"] if label != primary))
        vector = record.get("embeddings", {}).get("name_embedding")
        row = {"uuid": record["uuid"], "props": record["properties"],
               "vector": decode_vector(vector) if vector else None}
        await self._add((group, "node", primary, extras), row)

    async def add_edge(self, group: str, record: dict) -> None:
        if any(key[0] == group and key[1] == "node" for key in self.pending):
            await self.flush()  # an edge needs both of its nodes in the graph
        vector = record.get("embeddings", {}).get("fact_embedding")
        row = {"uuid": record["uuid"], "source": record["source"], "target": record["target"],
               "props": record["properties"], "vector": decode_vector(vector) if vector else None}
        await self._add((group, "edge", record["type"], record["source_label"], record["target_label"]), row)

    async def _add(self, key: tuple, row: dict) -> None:
        self.pending[key].append(row)
        if len(self.pending[key]) >= RESTORE_BATCH_ROWS:
            await self._write(key, self.pending.pop(key))

    async def flush(self) -> None:
        for key in sorted(self.pending, key=lambda k: k[1] == "edge"):
            await self._write(key, self.pending.pop(key))

    async def _write(self, key: tuple, rows: list[dict]) -> None:
        group, kind, *shape = key
        query = _node_query(*shape) if kind == "node" else _edge_query(*shape)
        await (await _falkordb()).select_graph(group).query(query, {"rows": rows})
        if kind == "node":
            self.nodes += len(rows)
        else:
            self.edges += len(rows)
        if self.progress:
            self.progress(self.nodes, self.edges)


async def _write_document(path: str, dimension: int, progress: Progress | None) -> None:
    events = _read_document(path, dimension)
    restorer = _Restorer(progress)
    group = ""
    while chunk := await asyncio.to_thread(lambda: list(itertools.islice(events, 1000))):
        for event, value in chunk:
            if event == "group":
                group = value
            elif event == "node":
                await restorer.add_node(group, value)
            elif event == "edge":
                await restorer.add_edge(group, value)
            elif event == "group_end":
                await restorer.flush()


async def _graph_counts(group: str) -> tuple[int, int]:
    if not await _graph_exists(group):
        return 0, 0
    graph = (await _falkordb()).select_graph(group)
    nodes = (await graph.ro_query("MATCH (n) RETURN count(n)")).result_set[0][0]
    edges = (await graph.ro_query("MATCH ()-[e]->() RETURN count(e)")).result_set[0][0]
    return nodes, edges


@contextlib.asynccontextmanager
async def _local_copy(source: str) -> AsyncIterator[str]:
    """The document as a local path: b2://bucket/name is downloaded (and its sha256 checked)."""
    if not source.startswith("b2://"):
        if not os.path.isfile(source):
            raise UsageError(f"no such file: {source}")
        yield source
        return
    bucket, _, name = source[len("b2://"):].partition("/")
    if not bucket or not name:
        raise UsageError(f"expected b2://<bucket>/<file name>, got {source!r}")
    settings().require_b2(bucket_needed=False)
    fd, temporary = tempfile.mkstemp(prefix="graphiti_restore_", suffix=".json")
    os.close(fd)
    try:
        def download(api: Any) -> dict:
            downloaded = api.get_bucket_by_name(bucket).download_file_by_name(name)
            downloaded.save_to(temporary)
            return downloaded.download_version.file_info

        async with span("memory.b2.download"):
            file_info = await _b2(download)
        expected = file_info.get("sha256")
        if expected and await asyncio.to_thread(_file_sha256, temporary) != expected:
            raise UsageError(f"{source} does not match its sha256 file info (corrupt upload?)")
        yield temporary
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def restore(source: str, replace: bool = False, dry_run: bool = False,
                  progress: Progress | None = None) -> str:
    """Restore an export document (a path or b2://bucket/name) into FalkorDB; returns a summary.

    The whole document is validated first; groups that already hold memories are refused unless
    `replace`, which drops them first. Embeddings come back as vectors, so search works at once."""
    async with operation("restore", **{"restore.replace": replace, "restore.dry_run": dry_run}) as op:
        return await _restore(op, source, replace, dry_run, progress)


async def _restore(op: _Span, source: str, replace: bool, dry_run: bool, progress: Progress | None) -> str:
    dimension = await asyncio.to_thread(_embedding_dimension)
    async with _local_copy(source) as path:
        async with span("memory.restore.validate"):
            plan = await asyncio.to_thread(validate_document, path, dimension)
        s = settings()
        async with _service("falkordb", s.falkordb_address):
            existing = {group: await _graph_counts(group) for group in plan.groups}
            occupied = [group for group, (nodes, _) in existing.items() if nodes]
            if dry_run:
                return _describe_plan(plan, existing, replace)
            if occupied and not replace:
                raise UsageError(f"group(s) {', '.join(occupied)} already hold memories; "
                                 "pass --replace to overwrite them")
            for group in plan.groups:
                if await _graph_exists(group):
                    await (await _falkordb()).select_graph(group).delete()
                _clients.indexed_groups.discard(group)
                await _ensure_indices(group)
            async with span("memory.restore.write"):
                await _write_document(path, dimension, progress)
            for group, counts in plan.groups.items():
                actual = await _graph_counts(group)
                if actual != (counts["nodes"], counts["edges"]):
                    raise ServiceError("falkordb", s.falkordb_address,
                                       f"group {group!r} has {actual[0]} nodes and {actual[1]} edges after the "
                                       f"restore, the document {counts['nodes']} and {counts['edges']} (duplicate "
                                       "uuids in the document, or an interrupted write: run it again with --replace)")
        for group in plan.groups:
            await _invalidate(group)
    nodes = sum(c["nodes"] for c in plan.groups.values())
    edges = sum(c["edges"] for c in plan.groups.values())
    op.set(**{"memory.groups": len(plan.groups), "memory.nodes": nodes, "memory.edges": edges})
    return f"restored {len(plan.groups)} group(s), {nodes} nodes, {edges} edges from {source}"


def _describe_plan(plan: RestorePlan, existing: dict[str, tuple[int, int]], replace: bool) -> str:
    lines = [f"dry run: export of {plan.header.get('exported_at')} ({len(plan.groups)} group(s)); nothing written"]
    for group, counts in plan.groups.items():
        nodes, edges = existing[group]
        if not nodes:
            action = "would create it"
        elif replace:
            action = f"would replace {nodes} nodes and {edges} edges"
        else:
            action = f"refused: it holds {nodes} nodes (pass --replace)"
        lines.append(f"group {group}: {counts['nodes']} nodes, {counts['edges']} edges; {action}")
    return "\n".join(lines)


# === CLI =========================================================================================

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (raised as UsageError)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog.split()[-1]}: {message}")


async def cmd_store(args: argparse.Namespace) -> int:
    content = sys.stdin.read() if args.content == "-" else args.content
    print(await store_episode(content, args.metadata))
    return 0


async def cmd_query(args: argparse.Namespace) -> int:
    print(await query_memory(args.search_query, args.limit))
    return 0


async def cmd_entities(args: argparse.Namespace) -> int:
    print(json.dumps(await get_entities(args.entity_type), ensure_ascii=False))
    return 0


async def cmd_health(args: argparse.Namespace) -> int:
    report = await health()
    for name, status in report.items():
        state = "ok" if status["ok"] else ("off" if name == "llm" else "FAIL")
        print(f"{name:<9} {state:<5} {status['address']}  {status['detail']}")
    return 0 if report["falkordb"]["ok"] and report["valkey"]["ok"] else 1


class _TerminalProgress:
    """'nodes and edges so far' on stderr, only on a terminal and only once a run passes a second."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.started = self.shown = time.monotonic()
        self.active = sys.stderr.isatty()
        self.printed = False

    def __call__(self, nodes: int, edges: int) -> None:
        now = time.monotonic()
        if self.active and now - self.started > 1 and now - self.shown > 0.25:
            print(f"\r{self.verb}: {nodes} nodes, {edges} edges", end="", file=sys.stderr, flush=True)
            self.shown, self.printed = now, True

    def finish(self) -> None:
        if self.printed:
            print(file=sys.stderr)


async def cmd_export(args: argparse.Namespace) -> int:
    progress = _TerminalProgress("exporting")
    try:
        message = await (export_to_file(args.output, progress) if args.output else export_to_b2(progress))
    finally:
        progress.finish()
    print(message, file=sys.stderr if args.output == "-" else sys.stdout)  # stdout holds the document
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    progress = _TerminalProgress("restoring")
    try:
        print(await restore(args.source, replace=args.replace, dry_run=args.dry_run, progress=progress))
    finally:
        progress.finish()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memory-manager", description="Agent memory for the OpenCode pod "
                     "(Graphiti on FalkorDB, Valkey query cache). Configured by environment variables.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    store = commands.add_parser("store", help="store one event; prints the episode name")
    store.add_argument("content", help="the event text, or - to read it from stdin")
    store.add_argument("metadata", nargs="?", help="a JSON object stored with the episode")
    store.set_defaults(handler=cmd_store)

    query = commands.add_parser("query", help="print the facts relevant to a question")
    query.add_argument("search_query", help="the question or keywords")
    query.add_argument("limit", nargs="?", type=int, default=5, help="facts to return, 1-50 (default 5)")
    query.set_defaults(handler=cmd_query)

    entities = commands.add_parser("entities", help="print the group's entities as a JSON array")
    entities.add_argument("entity_type", nargs="?", help="only entities of this type, e.g. File")
    entities.set_defaults(handler=cmd_entities)

    check = commands.add_parser("health", help="check FalkorDB and Valkey; exit 0 only if both answer")
    check.set_defaults(handler=cmd_health)

    export = commands.add_parser("export", help="export every memory group to B2 (or to a file)")
    export.add_argument("--output", metavar="PATH", help="write the document to PATH (- for stdout) instead of B2")
    export.set_defaults(handler=cmd_export)

    restore_ = commands.add_parser("restore", help="restore an export from a file or b2://bucket/name")
    restore_.add_argument("source", help="a path or b2://<bucket>/<file name>")
    restore_.add_argument("--replace", action="store_true", help="overwrite groups that already hold memories")
    restore_.add_argument("--dry-run", action="store_true", help="check the document and say what would change")
    restore_.set_defaults(handler=cmd_restore)
    return parser


async def _run(args: argparse.Namespace) -> int:
    try:
        return await args.handler(args)
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    # Only this module's warnings reach the user; dependencies' failures reach us as exceptions.
    logging.basicConfig(level=logging.CRITICAL, format="memory-manager: %(message)s")
    log.setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        code = asyncio.run(_run(args))
    except Exception as exc:  # the module's one broad catch: every failure becomes one line
        if os.environ.get("MEMORY_DEBUG") == "1":
            raise
        known = isinstance(exc, MemoryManagerError)
        detail = str(exc) if known else f"{type(exc).__name__}: {_describe(exc)}"
        print(f"memory-manager: error: {scrub(detail)}", file=sys.stderr)
        code = exc.exit_code if known else 1
    except KeyboardInterrupt:
        code = 130
    shutdown_telemetry()
    return code


def cli() -> None:
    """The process entry point (script and console script)."""
    code = main()
    if _telemetry.tracer is not None:
        # Spans are flushed and our clients closed; ddtrace's own exit hooks can still block for
        # seconds retrying an agent that stopped answering, so they are skipped.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
