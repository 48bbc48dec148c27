"""Fuzzing every RPC of the registry, composer and extractor on one real server (hypothesis).

Requests are built field by field from the proto descriptors (strings with NUL bytes, odd unicode,
huge and near-valid names; integers at the int32/int64 edges; repeated fields of 0..N items;
nested messages; unknown enum values), or derived from real requests (the shipped pool's names,
class names, ids, sha256s and page tokens, then one or two fields replaced), or are raw bytes and
mutated serializations sent as they are. Uploads send a metadata message, then chunks. Properties
of every call:

- its status is never INTERNAL, UNKNOWN or DATA_LOSS (nothing here corrupts stored bytes);
- it ends within its deadline (DEADLINE_EXCEEDED would be a hang);
- a call that failed changed nothing stored: what the API lists (pools, experts, jobs), the rows
  of every table and the blob files are the same before and after.

Examples per RPC: FUZZ_EXAMPLES by default, derandomized so that CI sees the same requests on every
run; `POE_FUZZ_EXAMPLES=5000` runs a longer, random fuzz (docs/SECURITY.md, "Fuzzing"). The same
runs against PostgreSQL for the registry's RPCs, with fewer examples.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor as pbd
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testenv import auth_env, own_postgres_database

from poe.engine.config import Settings
from poe.v1 import common_pb2, composer_pb2, extractor_pb2, registry_pb2
from poe_services import auth
from poe_services.host import MAX_MESSAGE_BYTES, create_server

POOL_DIR = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"

LONG_RUN = int(os.environ.get("POE_FUZZ_EXAMPLES", "0"))
FUZZ_EXAMPLES = LONG_RUN or 100
PG_EXAMPLES = max(1, LONG_RUN // 4) if LONG_RUN else 15
DEADLINE = 10.0  # seconds; a call that takes longer hangs
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
             grpc.StatusCode.DEADLINE_EXCEEDED}

PROTO_MODULES = {"poe.v1.Registry": registry_pb2, "poe.v1.Composer": composer_pb2, "poe.v1.Extractor": extractor_pb2}
METHODS: dict[str, pbd.MethodDescriptor] = {
    f"/{service}/{m.name}": m for service, module in PROTO_MODULES.items()
    for m in module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]].methods}
REGISTRY_METHODS = [m for m in METHODS if m.startswith("/poe.v1.Registry/")]
# Calls that change nothing: checked against the stored state even when they succeed.
READ_ONLY = {m for m, needed in auth.METHOD_PERMISSIONS.items() if needed == auth.READ}
# Streams that go on while a job runs: the first message (or the error) must come within the deadline.
OPEN_ENDED = {"/poe.v1.Extractor/WatchExtraction"}

# -- values ----------------------------------------------------------------------------------------

INT32_EDGES = [0, 1, -1, 2, 5, 9, 10, 1000, 1001, 32768, 2**31 - 1, -2**31]
INT64_EDGES = INT32_EDGES + [2**31, 2**32, 2**53 + 1, 2**63 - 1, -2**63]
UINT64_EDGES = [0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_EDGES = [0.0, -0.0, 0.5, 1.0, -1.0, 1e308, float("inf"), float("-inf"), float("nan"), 5e-324]
NASTY_STRINGS = [
    "", " ", "\x00", "\n", "a\x00b", "fashion-mnist\x00", "fashion-mnist\n", "fashion-mnist ", " fashion-mnist",
    "FASHION-MNIST", "fashion-mnist@1", "fashion-mnist@", "@1", "@", "fashion-mnist@@1", "fashion-mnist@1@1",
    "fashion-mnist@latest", "fashion-mnist@stable", "fashion_mnist", "../../etc/passwd", "/etc/passwd",
    "/dev/zero", "/proc/self/environ", "pools/fashion-mnist", "a" * 63, "a" * 64, "a" * 65, "\u202egol", "\ufb00",
    "\u0130", "\u00df", "\U0001F600", "e\u0301", "\ufeff", "\u200b", "\uffff", "\U0010ffff", "\u0663", "\uff13",
    "{}", "[]", "null", "true", "1e999", "NaN", "-Infinity", '{"a": NaN}', '{"a": 1e999}', '{"a": "\\ud800"}',
    '{"a":1,"a":2}', "[" * 10000, '{"a":' * 5000 + "1" + "}" * 5000, "-1", "0", "00", "01", "+1", "1.0", " 1",
    "9223372036854775807", "9223372036854775808", "99999999999999999999", "Sandal", "sandal", "SANDAL",
    "Ankle boot", "ankle  boot", "T-shirt/top", "footwear", "Footwear", "tops,bags", "%s%n%x", "\\", "'; --",
    "poe_x_y", "cpu", "cuda", "cuda:99", "mps", "auto", "latest", "torchscript", "onnx", "pt2", "safetensors",
    "format: poe.hierarchy/v1\ndataset: x\nversion: 1\nclasses: [a]\ntasks: {t: [a]}\n",
    "!!python/object/apply:os.system ['true']", "&a [*a, *a]", "a: &a [1]\nb: [*a, *a, *a]\n",
    "cuda:99999999999999999999", "cuda:-1", "cuda:\uff11", "cuda: 1", "cuda:1\n", "cuda:0x1", "cpu:0",
    # A YAML "billion laughs": nine levels of nine references each.
    "a: &a [x]\n" + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n"
                              for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
]


def forged_page_tokens(real: str) -> list[str]:
    """Tokens like `real` (base64 of {"o": offset, "q": fingerprint}) with other offsets and shapes."""
    data = json.loads(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4)))
    forged = [{**data, "o": o} for o in (-1, 0, 2**31, 2**63, 2**64, 1.5, "1", None, True, [1], {"o": 1})]
    forged += [{"o": 1}, {"q": data["q"]}, {**data, "q": 1}, {**data, "extra": 1}, [data], 1, "x", None]
    return [base64.urlsafe_b64encode(json.dumps(f).encode()).decode().rstrip("=") for f in forged]


def _mutations(text: str) -> list[str]:
    return [text + "\n", text + " ", " " + text, text + "\x00", "\x00" + text, text.upper(), text.lower(),
            text.title(), text + "@", text + "@1", text + "@latest", text + "/..", text * 20, text[:-1], text[1:],
            text.replace("-", "_"), text + "\u0301", text + "\u200b", text + "%", "".join(reversed(text)), text * 2000]


def _text_strategy(real: list[str]) -> st.SearchStrategy[str]:
    options = [st.sampled_from(NASTY_STRINGS), st.text(max_size=40),
               st.text(st.characters(codec="utf-8"), min_size=1, max_size=300),
               st.builds(lambda n, c: c * n, st.integers(1, 70_000), st.sampled_from(["a", "{", "[", "\x00", "é"]))]
    if real:
        options = [st.sampled_from(real), st.sampled_from(real).flatmap(lambda t: st.sampled_from(_mutations(t))),
                   *options]
    return st.one_of(options)


def _int_strategy(real: list[int], lo: int, hi: int, edges: list[int]) -> st.SearchStrategy[int]:
    options = [st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi)]
    if real:
        options.insert(0, st.sampled_from([v for v in real if lo <= v <= hi] or [0]))
        options.insert(1, st.sampled_from(real).map(lambda v: min(hi, max(lo, v + 1))))
    return st.one_of(options)


INT_RANGES = {pbd.FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1, INT32_EDGES),
              pbd.FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1, INT32_EDGES),
              pbd.FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1, INT32_EDGES),
              pbd.FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1, INT64_EDGES),
              pbd.FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1, INT64_EDGES),
              pbd.FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1, INT64_EDGES),
              pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, INT32_EDGES + [2**32 - 1]),
              pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, INT32_EDGES + [2**32 - 1]),
              pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, UINT64_EDGES),
              pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, UINT64_EDGES)}


@dataclass
class Corpus:
    """Real values of the running registry, by request field name (what near-valid requests use)."""

    values: dict[str, list] = field(default_factory=dict)
    strategies: dict[tuple, st.SearchStrategy] = field(default_factory=dict)  # built once per field

    def strategy(self, key: tuple, build: Callable[[], st.SearchStrategy]) -> st.SearchStrategy:
        if key not in self.strategies:
            self.strategies[key] = build()
        return self.strategies[key]

    def add(self, name: str, *values) -> None:
        self.values.setdefault(name, []).extend(v for v in values if v not in self.values.get(name, []))

    def of(self, f: pbd.FieldDescriptor) -> list:
        values = self.values.get(f.name, [])
        if f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            return [v for v in values if isinstance(v, Message) and v.DESCRIPTOR is f.message_type]
        if f.type == pbd.FieldDescriptor.TYPE_STRING:
            return [v for v in values if isinstance(v, str)]
        if f.type == pbd.FieldDescriptor.TYPE_BYTES:
            return [v for v in values if isinstance(v, bytes)]
        return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def scalar_strategy(f: pbd.FieldDescriptor, corpus: Corpus) -> st.SearchStrategy:
    real = corpus.of(f)
    t = f.type
    if t == pbd.FieldDescriptor.TYPE_STRING:
        return _text_strategy(real)
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.binary(min_size=1000, max_size=70_000),
                         *([st.sampled_from(real)] if real else []))
    if t in INT_RANGES:
        lo, hi, edges = INT_RANGES[t]
        return _int_strategy(real, lo, hi, edges)
    if t in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        floats = st.floats(width=64 if t == pbd.FieldDescriptor.TYPE_DOUBLE else 32)
        return st.one_of(st.sampled_from(FLOAT_EDGES if t == pbd.FieldDescriptor.TYPE_DOUBLE else [0.0, 1.0, -1.0]),
                         floats)
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pbd.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 2**31 - 1]),
                         st.integers(-2**31, 2**31 - 1))
    raise AssertionError(f"no strategy for field {f.full_name} of type {t}")


def value_strategy(f: pbd.FieldDescriptor, corpus: Corpus, depth: int) -> st.SearchStrategy:
    """A value for field `f` (a list for repeated fields)."""
    return corpus.strategy(("value", f.full_name, depth), lambda: _value_strategy(f, corpus, depth))


def _value_strategy(f: pbd.FieldDescriptor, corpus: Corpus, depth: int) -> st.SearchStrategy:
    if f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
        real = corpus.of(f)
        one = st.one_of(message_strategy(f.message_type, corpus, depth + 1),
                        *([st.sampled_from(real), st.sampled_from(real).flatmap(
                            lambda m: mutated(m, corpus, depth + 1))] if real else []))
    else:
        one = scalar_strategy(f, corpus)
    if not f.is_repeated:
        return one
    real = corpus.of(f)
    options = [st.lists(one, max_size=5)]
    if real and f.type != pbd.FieldDescriptor.TYPE_MESSAGE:
        options += [st.lists(st.sampled_from(real), max_size=len(real) + 2),
                    st.builds(_repeated, st.sampled_from(real), st.integers(2, 40_000))]
    if f.type != pbd.FieldDescriptor.TYPE_MESSAGE:
        options.append(st.builds(_repeated, one, st.integers(100, 40_000)))
    return st.one_of(options)


def _repeated(value, n: int) -> list:
    """`n` copies of `value`, fewer when they would take more than about 4 MB (a message holds 8 MiB)."""
    size = len(value) + 2 if isinstance(value, (str, bytes)) else 10
    return [value] * max(1, min(n, 4_000_000 // size))


def set_field(message: Message, f: pbd.FieldDescriptor, value) -> None:
    if f.is_repeated:
        target = getattr(message, f.name)
        del target[:]
        if f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
        getattr(message, f.name).CopyFrom(value)
    else:
        setattr(message, f.name, value)


@st.composite
def _message(draw, desc: pbd.Descriptor, corpus: Corpus, depth: int) -> Message:
    message = GetMessageClass(desc)()
    for f in desc.fields:
        if depth > 3 and f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            continue  # deep enough; a bigger message comes from the repeated strategies
        if draw(st.booleans()):
            set_field(message, f, draw(value_strategy(f, corpus, depth)))
    return message


def message_strategy(desc: pbd.Descriptor, corpus: Corpus, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of type `desc`, every field present or not."""
    return corpus.strategy(("message", desc.full_name, depth), lambda: _message(desc, corpus, depth))


@st.composite
def _mutated(draw, base: Message, corpus: Corpus, depth: int) -> Message:
    message = type(base)()
    message.CopyFrom(base)
    fields = list(base.DESCRIPTOR.fields)
    for f in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            message.ClearField(f.name)
        else:
            set_field(message, f, draw(value_strategy(f, corpus, depth)))
    return message


def mutated(base: Message, corpus: Corpus, depth: int = 0) -> st.SearchStrategy[Message]:
    """`base` with up to two of its fields replaced or cleared."""
    return _mutated(base, corpus, depth)


@st.composite
def _broken_bytes(draw, serialized: bytes) -> bytes:
    data = bytearray(serialized)
    how = draw(st.sampled_from(["truncate", "flip", "insert", "bad-utf8", "append"]))
    if how == "truncate" and data:
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i]) + draw(st.binary(min_size=1, max_size=16)) + bytes(data[i:])
    if how == "bad-utf8":
        # A length-delimited field (numbers 1..12: every string field of our requests) holding
        # bytes that are not UTF-8.
        number = draw(st.integers(1, 12))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"]))
        return bytes(data) + bytes([(number << 3) | 2, len(junk)]) + junk
    return bytes(data) + draw(st.binary(min_size=1, max_size=32))


def raw_strategy(message_strategy_: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes that are mostly not a valid message: random ones and broken serializations."""
    return st.one_of(st.binary(max_size=200),
                     message_strategy_.map(lambda m: m.SerializeToString()).flatmap(_broken_bytes))


# -- the server under test -----------------------------------------------------------------------------

@dataclass
class Target:
    channel: grpc.Channel
    blob_dir: Path
    database: object  # a DB-API connection to the registry's database
    tables: list[str]
    corpus: Corpus
    seeds: dict[str, list]  # method -> real requests (uploads: (metadata message, chunks))
    admin: tuple
    service: tuple

    def metadata(self, method: str) -> tuple:
        return self.service if auth.METHOD_PERMISSIONS[method] == auth.INTERNAL else self.admin


def _settings(home: Path, database_url: str, **env: str) -> Settings:
    (home / "no-data").mkdir(parents=True, exist_ok=True)
    return Settings.from_env({**auth_env(), "POE_HOME": str(home), "POE_DATABASE_URL": database_url,
                              "POE_BLOB_URL": f"file://{home / 'blobs'}", "POE_REGISTRY_HEALTH_INTERVAL": "0.1",
                              "POE_EXTRACTOR_HEALTH_INTERVAL": "0.1", "POE_DEFAULT_POOL": "fashion-mnist",
                              # No composition is recorded in the background (state would change
                              # between calls), and no data set exists: no job ever trains.
                              "POE_RECORD_COMPOSITIONS": "false", "POE_DATA_DIR": str(home / "no-data"),
                              "POE_LOG_LEVEL": "WARNING", **env})


def _unary(channel: grpc.Channel, method: str, request: Message, response_cls, metadata):
    call = channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                               response_deserializer=response_cls.FromString)
    return call(request, timeout=60, metadata=metadata)


def _setup_target(channel: grpc.Channel, blob_dir: Path, database_url: str) -> Target:
    """Imports the shipped pool, then gathers real values and requests from the registry."""
    from poe.client.registry import RegistryClient

    admin = (("authorization", f"Bearer {os.environ['POE_TOKEN']}"),)
    service = (("authorization", f"Bearer {os.environ['POE_SERVICE_TOKEN']}"),)
    with RegistryClient(channel=channel, token=os.environ["POE_TOKEN"]) as reg:
        pool, _ = reg.import_pool(POOL_DIR)
    r, c = registry_pb2, common_pb2
    library = pool.library
    oracle = _unary(channel, "/poe.v1.Registry/GetOracle", r.GetOracleRequest(id=library.oracle_id),
                    r.GetOracleResponse, admin).oracle
    corpus = Corpus()
    ref = f"{pool.name}@{pool.version}"
    names = list(pool.hierarchy.classes)
    tasks = [t.name for t in pool.hierarchy.tasks]
    corpus.add("pool", pool.name, ref, f"{pool.name}@latest", "")
    corpus.add("base_pool", pool.name, ref)
    corpus.add("name", pool.name, library.name, oracle.name)
    corpus.add("pool_name", pool.name, "fuzzed")
    corpus.add("version", pool.version, "2")
    corpus.add("pool_version", pool.version, "2")
    corpus.add("alias", "latest", "stable")
    corpus.add("aliases", "stable", "latest")
    corpus.add("dataset", pool.dataset, str(POOL_DIR))
    corpus.add("hierarchy", pool.hierarchy, pool.dataset, str(POOL_DIR / "hierarchy.yaml"))
    corpus.add("hierarchy_text", (POOL_DIR / "hierarchy.yaml").read_text())
    corpus.add("classes", *names, *names[0].upper(), "0", "9", "10")
    corpus.add("class_name", *names)
    corpus.add("class_names", *names)
    corpus.add("tasks", *tasks)
    corpus.add("task", *tasks)
    corpus.add("class_ids", *range(10))
    corpus.add("sha256", library.blob.sha256, oracle.blob.sha256, *(x.blob.sha256 for x in pool.experts))
    corpus.add("size", library.blob.size, *(x.blob.size for x in pool.experts))
    corpus.add("offset", 1, library.blob.size - 1, library.blob.size)
    corpus.add("length", 1, library.blob.size)
    corpus.add("id", library.id, oracle.id, *(x.id for x in pool.experts), str(library.id), ref)
    corpus.add("library_id", library.id)
    corpus.add("oracle_id", oracle.id)
    corpus.add("registry_id", oracle.id)
    corpus.add("expert_ids", *(x.id for x in pool.experts))
    corpus.add("hierarchy_version", pool.hierarchy.version)
    corpus.add("params", library.params, oracle.params)
    corpus.add("page_size", 1, 2, 1000)
    corpus.add("format", "torchscript", "onnx", "pt2", "safetensors")
    corpus.add("kind", "pool", "expert", "library", "oracle", "composed_model", "dataset")
    corpus.add("device", "cpu", "auto")
    corpus.add("path", str(POOL_DIR / "oracle.safetensors"), "oracle.safetensors")
    for key, value in (("config_json", library.config_json), ("config_json", oracle.config_json),
                       ("config_json", pool.experts[0].config_json), ("metrics_json", library.metrics_json),
                       ("loss_json", library.loss_json), ("info_json", pool.info_json),
                       ("loss_json", pool.experts[0].loss_json)):
        corpus.add(key, value)

    # A composed model in the cache, and extraction jobs: their ids and sha256s are real too.
    parts = list(channel.unary_stream("/poe.v1.Composer/ComposeModel",
                                      request_serializer=composer_pb2.ComposeModelRequest.SerializeToString,
                                      response_deserializer=composer_pb2.ComposeModelResponse.FromString)(
        composer_pb2.ComposeModelRequest(classes=["Sandal", "Bag"]), timeout=120, metadata=admin))
    header, model = parts[0].header, b"".join(p.chunk for p in parts[1:])
    # The first model of each other format loads its exporter (torch.export, ONNX): seconds, once.
    # Done here, so that a fuzzed request's deadline measures the request.
    for fmt in (composer_pb2.MODEL_FORMAT_PT2, composer_pb2.MODEL_FORMAT_ONNX, composer_pb2.MODEL_FORMAT_SAFETENSORS):
        list(channel.unary_stream("/poe.v1.Composer/ComposeModel")(
            composer_pb2.ComposeModelRequest(classes=["Sandal", "Bag"], format=fmt).SerializeToString(), timeout=120,
            metadata=admin))
    composed_meta = r.ComposedModelMetadata(pool=header.pool, class_ids=list(header.class_ids), format="torchscript",
                                            metadata_json=header.metadata_json, sha256=header.sha256, size=len(model))
    put = channel.stream_unary("/poe.v1.Registry/PutComposedModel",
                               request_serializer=r.PutComposedModelRequest.SerializeToString,
                               response_deserializer=r.PutComposedModelResponse.FromString)
    put(iter([r.PutComposedModelRequest(metadata=composed_meta), r.PutComposedModelRequest(chunk=model)]),
        timeout=60, metadata=service)
    corpus.add("sha256", header.sha256)
    corpus.add("id", header.sha256)
    corpus.add("metadata_json", header.metadata_json)
    corpus.add("class_ids", *header.class_ids)
    jobs = [_unary(channel, "/poe.v1.Registry/CreateExtractionJob",
                   r.CreateExtractionJobRequest(job_id=f"fuzz-{i}", params_json='{"dataset": "fashion-mnist"}',
                                                oracle_id=oracle.id), r.CreateExtractionJobResponse, service).job
            for i in range(2)]
    corpus.add("job_id", *(j.id for j in jobs))
    corpus.add("params_json", jobs[0].params_json)
    corpus.add("state", c.EXTRACTION_STATE_PENDING)
    for method, request, response in (
            ("/poe.v1.Registry/ListExperts", r.ListExpertsRequest(page_size=1), r.ListExpertsResponse),
            ("/poe.v1.Registry/ListExtractionJobs", r.ListExtractionJobsRequest(page_size=1),
             r.ListExtractionJobsResponse),
            ("/poe.v1.Extractor/ListExtractions", extractor_pb2.ListExtractionsRequest(page_size=1),
             extractor_pb2.ListExtractionsResponse)):
        try:
            token = _unary(channel, method, request, response, admin).next_page_token
            corpus.add("page_token", token, *forged_page_tokens(token))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:  # a service this server does not host
                raise

    # Real requests of the methods whose valid requests need more than single real fields.
    expert = pool.experts[0]
    expert_bytes = b"".join(m.data for m in channel.unary_stream(
        "/poe.v1.Registry/Download", request_serializer=r.DownloadRequest.SerializeToString,
        response_deserializer=r.DownloadResponse.FromString)(r.DownloadRequest(sha256=expert.blob.sha256),
                                                             timeout=60, metadata=admin))
    seeds: dict[str, list] = {
        "/poe.v1.Registry/RegisterHierarchy": [r.RegisterHierarchyRequest(hierarchy=pool.hierarchy)],
        "/poe.v1.Registry/PublishPool": [r.PublishPoolRequest(
            name=pool.name, version="2", library_id=library.id, expert_ids=[x.id for x in pool.experts],
            info_json=pool.info_json, aliases=["stable"])],
        "/poe.v1.Registry/SetPoolAlias": [r.SetPoolAliasRequest(name=pool.name, alias="stable", version=pool.version)],
        "/poe.v1.Registry/UpdateExtractionJob": [r.UpdateExtractionJobRequest(
            job_id=jobs[1].id, state=c.EXTRACTION_STATE_RUNNING, progress=0.5, stage="library", message="m")],
        "/poe.v1.Composer/ComposeModel": [composer_pb2.ComposeModelRequest(pool=ref, classes=["Sandal", "bag", "0"],
                                                                           tasks=["footwear"])],
        "/poe.v1.Extractor/StartExtraction": [extractor_pb2.StartExtractionRequest(
            params=extractor_pb2.ExtractionParams(
                dataset=pool.dataset, base_pool=pool.name, tasks=tasks[:1], pool_version="9", subset=100,
                library_epochs=1, expert_epochs=1, device="cpu"), job_id="fuzz-start"),
            extractor_pb2.StartExtractionRequest(params=extractor_pb2.ExtractionParams(
                dataset=pool.dataset, oracle=extractor_pb2.OracleSource(registry_id=oracle.id), subset=100))],
        # Uploads: (metadata, bytes) of real artifacts.
        "/poe.v1.Registry/RegisterExpert": [(r.ExpertMetadata(
            library_id=library.id, hierarchy_version=expert.hierarchy_version, task=expert.task,
            class_ids=list(expert.class_ids), config_json=expert.config_json, params=expert.params,
            val_accuracy=expert.val_accuracy, metrics_json=expert.metrics_json, loss_json=expert.loss_json,
            sha256=expert.blob.sha256, size=expert.blob.size), expert_bytes)],
        "/poe.v1.Registry/RegisterLibrary": [(r.LibraryMetadata(
            name="fuzz-library", dataset=pool.dataset, oracle_id=oracle.id, config_json=library.config_json,
            params=library.params, sha256=hashlib.sha256(expert_bytes).hexdigest(), size=len(expert_bytes)),
            expert_bytes)],
        "/poe.v1.Registry/RegisterOracle": [(r.OracleMetadata(
            name="fuzz-oracle", dataset=pool.dataset, config_json=oracle.config_json, params=oracle.params,
            sha256=hashlib.sha256(expert_bytes).hexdigest(), size=len(expert_bytes)), expert_bytes)],
        "/poe.v1.Registry/PutComposedModel": [(composed_meta, model)],
        "/poe.v1.Registry/PutComposedModels": [r.PutComposedModelsRequest(
            models=[r.ComposedModelUpload(metadata=composed_meta, data=model)])],
    }
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    tables = sorted(sa.inspect(engine).get_table_names())
    return Target(channel, blob_dir, engine.raw_connection(), tables, corpus, seeds, admin, service)


def _channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    """Registry, composer and extractor on one loopback server; SQLite and file blobs under tmp."""
    home = tmp_path_factory.mktemp("fuzz") / "home"
    database_url = f"sqlite:///{home / 'registry.sqlite3'}"
    with pytest.MonkeyPatch.context() as env:
        # Built-in data sets are read from the process's POE_DATA_DIR: none here, so no job trains.
        env.setenv("POE_DATA_DIR", str(home / "no-data"))
        host = create_server("127.0.0.1:0", _settings(home, database_url), migrate=True, warm=False)
        host.start()
        channel = _channel(host.port)
        try:
            t = _setup_target(channel, home / "blobs", database_url)
            yield t
            t.database.close()
        finally:
            channel.close()
            host.stop(None).wait(30)


@pytest.fixture(scope="module")
def pg_target(tmp_path_factory) -> Iterator[Target]:
    """The registry alone on one loopback server, on a PostgreSQL database of its own."""
    with own_postgres_database("poe_fuzz_test") as (_admin, _name, database_url):
        home = tmp_path_factory.mktemp("fuzz-pg") / "home"
        host = None
        channel = None
        try:
            # The composer too: the set-up composes a model to have a real composed-model record.
            host = create_server("127.0.0.1:0", _settings(home, database_url), ("registry", "composer"),
                                 migrate=True, warm=False)
            host.start()
            channel = _channel(host.port)
            t = _setup_target(channel, home / "blobs", database_url)
            yield t
            t.database.close()
        finally:
            if channel is not None:
                channel.close()
            if host is not None:
                host.stop(None).wait(30)


# -- requests -----------------------------------------------------------------------------------------

def request_strategy(target: Target, method: str) -> st.SearchStrategy[list[bytes] | bytes]:
    """What one call sends: the serialized request (client streams: the list of serialized messages)."""
    desc = METHODS[method]
    corpus = target.corpus
    random_message = message_strategy(desc.input_type, corpus)
    seeds = [s for s in target.seeds.get(method, []) if isinstance(s, Message)]
    near_valid = [mutated(GetMessageClass(desc.input_type)(), corpus)]  # real values in 1-2 fields
    if seeds:
        near_valid.append(st.sampled_from(seeds).flatmap(lambda m: mutated(m, corpus)))
    message = st.one_of(random_message, *near_valid)
    if not desc.client_streaming:
        return st.one_of(message.map(lambda m: m.SerializeToString()), raw_strategy(message))
    return upload_strategy(target, method, message)


def upload_strategy(target: Target, method: str, message: st.SearchStrategy[Message]) -> st.SearchStrategy:
    request_cls = GetMessageClass(METHODS[method].input_type)
    metadata_field = request_cls.DESCRIPTOR.fields_by_name["metadata"]
    real = [s for s in target.seeds.get(method, []) if isinstance(s, tuple)]

    @st.composite
    def consistent(draw) -> list[bytes]:
        """Metadata (real or random, one or two fields changed) declaring the sha256 and size of the
        chunks that follow, so that the upload reaches the checks made after the bytes arrived."""
        if real and draw(st.booleans()):
            base, data = draw(st.sampled_from(real))
            meta = draw(mutated(base, target.corpus))
            if draw(st.booleans()):
                data = draw(st.binary(max_size=2048))
        else:
            meta = draw(message_strategy(metadata_field.message_type, target.corpus))
            data = draw(st.binary(max_size=2048))
        if draw(st.integers(0, 3)):
            meta.sha256, meta.size = hashlib.sha256(data).hexdigest(), len(data)
        cut = draw(st.integers(max(1, len(data) // 64), max(1, len(data))))  # at most 64 chunks
        chunks = [data[i:i + cut] for i in range(0, len(data), cut)]
        return [request_cls(metadata=meta).SerializeToString(),
                *(request_cls(chunk=chunk).SerializeToString() for chunk in chunks)]

    item = st.one_of(message.map(lambda m: m.SerializeToString()), raw_strategy(message))
    return st.one_of(consistent(), st.lists(item, max_size=5),
                     st.builds(lambda first, rest: [first, *rest], message.map(lambda m: m.SerializeToString()),
                               st.lists(st.binary(max_size=300).map(lambda b: request_cls(chunk=b).SerializeToString())
                                        | raw_strategy(message), max_size=4)))


# -- the properties -------------------------------------------------------------------------------------

def call(target: Target, method: str, request) -> grpc.StatusCode:
    """Sends `request` (bytes, or a list of them for client streams) as it is; the status code."""
    desc = METHODS[method]
    kind = {(False, False): target.channel.unary_unary, (False, True): target.channel.unary_stream,
            (True, False): target.channel.stream_unary, (True, True): target.channel.stream_stream}
    stub = kind[(desc.client_streaming, desc.server_streaming)](method)  # no serializers: bytes as they are
    arg = iter(request) if desc.client_streaming else request
    try:
        result = stub(arg, timeout=DEADLINE, metadata=target.metadata(method))
        if desc.server_streaming:
            if method in OPEN_ENDED:
                next(result, None)
                result.cancel()
            else:
                for _ in result:
                    pass
    except grpc.RpcError as e:
        assert e.code() not in FORBIDDEN, f"{method}: {e.code().name}: {e.details()}"
        return e.code()
    return grpc.StatusCode.OK


def _list_all(target: Target, method: str, request_cls, response_cls, items: str) -> list[bytes]:
    out, token = [], ""
    while True:
        resp = _unary(target.channel, method, request_cls(page_size=1000, page_token=token), response_cls,
                      target.admin)
        out += [x.SerializeToString(deterministic=True) for x in getattr(resp, items)]
        token = resp.next_page_token
        if not token:
            return out


def listed_state(target: Target) -> dict:
    """What the registry's API lists: pools (and each version as GetPool serves it), experts, jobs."""
    r = registry_pb2
    pools = _list_all(target, "/poe.v1.Registry/ListPools", r.ListPoolsRequest, r.ListPoolsResponse, "pools")
    versions = []
    for raw in pools:
        p = r.PoolVersion.FromString(raw)
        got = _unary(target.channel, "/poe.v1.Registry/GetPool", r.GetPoolRequest(pool=f"{p.name}@{p.version}"),
                     r.GetPoolResponse, target.admin)
        versions.append(got.pool.SerializeToString(deterministic=True))
    return {"pools": pools, "versions": versions,
            "experts": _list_all(target, "/poe.v1.Registry/ListExperts", r.ListExpertsRequest,
                                 r.ListExpertsResponse, "experts"),
            "jobs": _list_all(target, "/poe.v1.Registry/ListExtractionJobs", r.ListExtractionJobsRequest,
                              r.ListExtractionJobsResponse, "jobs")}


def stored_state(target: Target) -> dict:
    """Every row of every table (a digest per table) and the blob files (staging left out)."""
    rows = {}
    cursor = target.database.cursor()  # the DB-API connection: 30x faster than SQLAlchemy's here
    try:
        for table in target.tables:
            cursor.execute(f'SELECT * FROM "{table}"')
            digest = hashlib.sha256()
            for row in sorted(map(repr, cursor.fetchall())):
                digest.update(row.encode())
            rows[table] = digest.hexdigest()
    finally:
        cursor.close()
        target.database.rollback()  # no transaction left open between calls
    blobs = sorted((str(p.relative_to(target.blob_dir)), p.stat().st_size)
                   for p in (target.blob_dir / "sha256").rglob("*") if p.is_file())
    runs = target.blob_dir.parent / "extractions"  # the extractor's run directories
    return {**rows, "blob files": blobs, "run directories": sorted(os.listdir(runs)) if runs.is_dir() else []}


def _changes(before: dict, after: dict) -> list[str]:
    """What differs, briefly: the key and the first record that changed."""
    out = []
    for key in before:
        if before[key] != after[key]:
            old, new = before[key], after[key]
            if isinstance(old, list):
                old, new = [x for x in old if x not in new][:1], [x for x in new if x not in old][:1]
            out.append(f"{key} ({str(old)[:300]} -> {str(new)[:300]})")
    return out




def fuzz(target: Target, method: str, examples: int) -> Callable[[], None]:
    """A hypothesis test of `method`: forbidden codes, hangs and failed calls that changed something.

    After every call the tables and blob files are compared with before (cheap); what the API lists
    is compared at the end, and read again after each call that changed something as it may."""
    requests = request_strategy(target, method)
    # GetComposedModel counts a hit: a read that succeeds still writes.
    checked_on_success = method in READ_ONLY and method != "/poe.v1.Registry/GetComposedModel"
    state = {"stored": stored_state(target), "listed": listed_state(target)}

    @settings(max_examples=examples, deadline=None, derandomize=not LONG_RUN, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        request = data.draw(requests, label="request")
        started = time.monotonic()
        code = call(target, method, request)
        # No data set exists here: a job that started could only fail later, behind the caller's back.
        assert not (method == "/poe.v1.Extractor/StartExtraction" and code == grpc.StatusCode.OK), \
            "StartExtraction accepted a job that cannot run"
        assert time.monotonic() - started < DEADLINE + 1, f"{method} took {time.monotonic() - started:.1f} s"
        after = stored_state(target)
        if code != grpc.StatusCode.OK or checked_on_success:
            changed = _changes(state["stored"], after)
            assert not changed, f"{method} answered {code.name} but changed {'; '.join(changed)}"
        elif after != state["stored"]:
            state["listed"] = listed_state(target)
        state["stored"] = after

    def run_and_compare_listings() -> None:
        run()
        changed = _changes(state["listed"], listed_state(target))
        assert not changed, f"{method}: failed calls changed what the API lists: {'; '.join(changed)}"

    return run_and_compare_listings


@pytest.mark.parametrize("method", list(METHODS))
def test_fuzz_every_rpc(target, method):
    fuzz(target, method, FUZZ_EXAMPLES)()


@pytest.mark.postgres
@pytest.mark.parametrize("method", REGISTRY_METHODS)
def test_fuzz_registry_rpcs_on_postgresql(pg_target, method):
    fuzz(pg_target, method, PG_EXAMPLES)()


def test_undecodable_requests_are_invalid_argument(target):
    """Bytes that are no request message: INVALID_ARGUMENT naming the message type, unary and streamed."""
    for method, request in (("/poe.v1.Registry/GetPool", b"\xff"),
                            ("/poe.v1.Registry/RegisterOracle", [b"\x0a\x02\xff\xff"]),
                            ("/poe.v1.Composer/ComposeModel", b"\x12\x01\x80")):
        desc = METHODS[method]
        kind = target.channel.stream_unary if desc.client_streaming else (
            target.channel.unary_stream if desc.server_streaming else target.channel.unary_unary)
        with pytest.raises(grpc.RpcError) as e:
            result = kind(method)(iter(request) if desc.client_streaming else request, timeout=DEADLINE,
                                  metadata=target.admin)
            if desc.server_streaming:
                list(result)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.details())
        assert e.value.details() == f"request: not a valid {desc.input_type.full_name} message"


@pytest.mark.parametrize("name", ["lr", "temperature", "soft_weight", "scale_weight", "ray_cpus_per_task",
                                  "ray_gpus_per_task"])
def test_start_extraction_refuses_numbers_that_are_not_finite(target, name):
    """An infinite learning rate or loss weight would train NaN weights into a published pool; an
    infinite or NaN resource would reach Ray's scheduler."""
    for value in (float("inf"), float("-inf"), float("nan")):
        params = extractor_pb2.ExtractionParams(dataset="fashion-mnist", subset=100, **{name: value})
        request = extractor_pb2.StartExtractionRequest(params=params).SerializeToString()
        with pytest.raises(grpc.RpcError) as e:
            target.channel.unary_unary("/poe.v1.Extractor/StartExtraction")(request, timeout=DEADLINE,
                                                                            metadata=target.admin)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"params.{name}: "), e.value.details()


def test_fuzz_bearer_tokens(target):
    """Any authorization value is a valid token (OK) or UNAUTHENTICATED, never an error of the server."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
    real = os.environ["POE_TOKEN"]
    values = st.one_of(printable, printable.map(lambda t: "Bearer " + t), printable.map(lambda t: "bearer poe_" + t),
                       st.sampled_from([real, real[:-1], real + "A", real.upper(), real.replace("_", "-"), "Bearer",
                                        "Bearer  " + real, "Basic " + real, "poe_test-admin_" + "A" * 5000]),
                       st.builds(lambda i, s: f"Bearer poe_{i}_{s}", st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True),
                                 st.from_regex(r"[A-Za-z0-9]{20,200}", fullmatch=True)))
    request = registry_pb2.ListPoolsRequest(page_size=1).SerializeToString()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
              suppress_health_check=list(HealthCheck))
    @given(values)
    def run(value):
        try:
            target.channel.unary_unary("/poe.v1.Registry/ListPools")(
                request, timeout=DEADLINE, metadata=(("authorization", value),))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (value[:80], e.code(), e.details())
        else:
            scheme, _, token = value.partition(" ")
            assert scheme.lower() == "bearer" and token.strip() == real, value[:80]

    run()


def test_status_messages_are_cut_to_fit_the_metadata_limit():
    from poe.engine.errors import InvalidArgument
    from poe_services.errors import MAX_STATUS_MESSAGE_BYTES, shorten_message, status_of

    def sent(message: str) -> int:  # the grpc-message header: percent-encoded UTF-8
        return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())

    assert shorten_message("pool: not found") == "pool: not found"
    for text in ("x" * 100_000, "\u00e9" * 5000, "\U0001F600" * 3000, "%" * 4000, "a\udc80b" * 2000):
        code, message = status_of(InvalidArgument(f"pool: {text}"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("pool: ")
        assert sent(message) <= MAX_STATUS_MESSAGE_BYTES and message.endswith("characters in all)"), message[-60:]
