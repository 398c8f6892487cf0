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
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
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
    "store_episode", "query_memory", "get_entities", "health", "close", "main",
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

    def secrets(self) -> list[str]:
        return [s for s in (self.falkordb_password, self.valkey_password, self.openai_api_key) if s]

    def require_llm(self) -> str:
        if not self.openai_api_key:
            raise UsageError("OPENAI_API_KEY is not set (needed to store and to answer uncached queries)")
        return self.openai_api_key


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
    api_key = s.require_llm()
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
    if not _clients.cache_warned:
        _clients.cache_warned = True
        log.warning("cache unavailable (%s); answering without it", exc)


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
            acquired = await lock.acquire()
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
    await (await _graphiti()).build_indices_and_constraints()
    _clients.indexed_groups.add(group)


async def store_episode(content: str, metadata: dict | str | None = None) -> str:
    """Store one OpenCode event as an episode of the group's graph; returns the episode name."""
    s = settings()
    content = _validate_content(content, s.max_episode_chars)
    metadata = _validate_metadata(metadata)
    graphiti = await _graphiti()
    from graphiti_core.nodes import EpisodeType

    async with _group_write_lock(s.group_id):
        now = datetime.now(timezone.utc)
        name = episode_name(now)
        async with _service("falkordb", s.falkordb_address), _llm_service():
            await _ensure_indices(s.group_id)
            result = await graphiti.add_episode(
                name=name, episode_body=content, source_description=EPISODE_SOURCE,
                reference_time=now, source=EpisodeType.text, group_id=s.group_id,
                entity_types=_entity_types(),
            )
            if metadata is not None:
                await graphiti.driver.execute_query(
                    "MATCH (e:Episodic {uuid: $uuid}) SET e.metadata = $metadata",
                    uuid=result.episode.uuid, metadata=json.dumps(metadata, sort_keys=True),
                )
        await _invalidate(s.group_id)
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
    return format_facts(results.edges)


async def query_memory(search_query: str, limit: int = 5) -> str:
    """Facts relevant to the query, one per line with their validity window; cached per group."""
    if not isinstance(search_query, str) or not search_query.strip():
        raise UsageError("query must be non-empty text")
    limit = _validate_limit(limit)
    group = settings().group_id
    cached, key = await _cache_lookup(group, search_query, limit)
    if cached is not None:
        return cached
    answer = await _search(search_query, limit)
    if key is not None:
        await _cache_store(key, answer)
    return answer


async def get_entities(entity_type: str | None = None) -> list[dict]:
    """{"name", "type"} for every entity of the group, sorted by name; type is the most specific
    label. The filter is validated and passed as a query parameter, never pasted into Cypher."""
    entity_type = _validate_entity_type(entity_type)
    s = settings()
    if not await _graph_exists(s.group_id):
        return []
    async with _service("falkordb", s.falkordb_address):
        result = await (await _falkordb()).select_graph(s.group_id).ro_query(
            "MATCH (n:Entity) WHERE $type IS NULL OR $type IN labels(n) "
            "RETURN n.name, labels(n) ORDER BY toLower(n.name), n.name, n.uuid",
            {"type": entity_type},
        )
    return [{"name": name, "type": _specific_label(labels)} for name, labels in result.result_set]


def _specific_label(labels: list[str]) -> str:
    specific = sorted(label for label in labels if label != "Entity")
    return specific[0] if specific else "Entity"


async def health() -> dict:
    """Reachability of FalkorDB and Valkey (bounded to about a second) and the LLM endpoint."""
    s = settings()
    falkordb, valkey = await asyncio.gather(
        _probe(s.falkordb_address, _falkordb_probe), _probe(s.valkey_address, _valkey_probe))
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
        state = "ok" if status["ok"] else "FAIL"
        if name == "llm":
            state = "ok" if status["ok"] else "off"
        print(f"{name:<9} {state:<5} {status['address']}  {status['detail']}")
    return 0 if report["falkordb"]["ok"] and report["valkey"]["ok"] else 1


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
    return parser


async def _run(args: argparse.Namespace) -> int:
    try:
        return await args.handler(args)
    finally:
        await close()


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="memory-manager: warning: %(message)s")
    logging.getLogger("graphiti_core").setLevel(logging.CRITICAL)  # its errors reach us as exceptions
    secrets: list[str] = []
    try:
        args = build_parser().parse_args(argv)
        secrets = settings().secrets()
        return asyncio.run(_run(args))
    except Exception as exc:  # the module's one broad catch: every failure becomes one line
        if os.environ.get("MEMORY_DEBUG") == "1":
            raise
        known = isinstance(exc, MemoryManagerError)
        detail = str(exc) if known else f"{type(exc).__name__}: {_describe(exc)}"
        print(f"memory-manager: error: {_scrub(detail, secrets)}", file=sys.stderr)
        return exc.exit_code if known else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
