"""Every bound on client input, in one place, and the checks that enforce them.

The services check each request field against these limits before anything is parsed deeply,
built or stored, so that a request either fails with InvalidArgument naming its field or leaves
records that can always be served back: every stored record fits a gRPC message with room to
spare, and every List page is cut by bytes as well as by count. docs/LIMITS.md lists the limits
with their reasons; this module is torch-free and gRPC-free, so the engine, the contract and every
service can use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

from poe.engine.errors import field_error
from poe.engine.names import ALIAS, FORMAT, JOB_ID, NAME, SHA256, VERSION

# -- messages and pages ----------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 8 << 20  # the gRPC message limit of every server and client (weights are streamed in 1 MiB chunks)
MAX_RECORD_BYTES = 4 << 20  # one record as served (a pool version with hierarchy and experts): half a message
MAX_PAGE_BYTES = 4 << 20  # a List page stops before this many bytes of records (it always holds one record)
MAX_PAGE_TOKEN_CHARS = 256  # our tokens are about 40 characters; anything far longer was not issued by us
MAX_PAGE_OFFSET = (1 << 31) - 1  # a page token's row offset: beyond any table the registry can hold

# -- names and free text ---------------------------------------------------------------------------

MAX_LABEL_CHARS = 256  # display names of oracles and libraries (their column width)
MAX_CLASS_NAME_CHARS = 128  # longer than any data set's class names we know (ImageNet's longest is 98)
MAX_CLASS_KEY_CHARS = 256  # a class name case-folded (its look-up key column); folding can lengthen a name
MAX_REF_CHARS = 128  # a class or task reference in a request: no longer than any name it could match
MAX_DESCRIPTION_CHARS = 4096  # a pool version's description: a paragraph, not a document
MAX_JOB_STAGE_CHARS = 64  # an extraction job's stage (its column width)
MAX_JOB_MESSAGE_CHARS = 4096  # an extraction job's progress message
MAX_JOB_ERROR_CHARS = 16384  # an extraction job's error: room for the last lines of a traceback

# -- classes, tasks and repeated fields ------------------------------------------------------------

MAX_CLASSES = 32768  # classes of one data set (ImageNet-21k's 21,841 fit), also classes per request
MAX_CLASS_NAMES_BYTES = 512 << 10  # UTF-8 bytes of all class names of a hierarchy: a pool record repeats them 3x
MAX_TASKS = 1024  # primitive tasks per hierarchy, hence experts per pool and tasks per request
MAX_ALIASES = 64  # aliases of one pool (each one is listed in its version's record)

# -- JSON ------------------------------------------------------------------------------------------

MAX_JSON_BYTES = 64 << 10  # configs, metrics, loss settings, pool info: a few hundred bytes in practice
MAX_LARGE_JSON_BYTES = 3 << 20  # job params and composed-model metadata, which may carry a whole hierarchy
MAX_JSON_DEPTH = 32  # nesting of any JSON value (ours nest 3 deep); also keeps the parser from recursing deeply

# -- integers --------------------------------------------------------------------------------------

MAX_INT64 = (1 << 63) - 1  # ids and sizes are int64 on the wire and in every database
MAX_INT32 = (1 << 31) - 1  # versions, class ids and page sizes are int32 on the wire

# -- networks (checked before any module is built) -------------------------------------------------

MAX_WRN_DEPTH = 40  # oracle and library students: WRN-40-10 (56M parameters) is the largest we allow
MAX_WRN_WIDTH = 10
MAX_IN_CHANNELS = 16  # image channels
MAX_EXPERT_WIDTH = 256  # an expert's channels (16 in the shipped pool); 256 with 6 blocks is ~30 MB of weights
MAX_EXPERT_BLOCKS = 6  # blocks in an expert's group (a WRN-40's group has 6)
MAX_EXPERT_IN_CHANNELS = 32 * MAX_WRN_WIDTH  # a library's output channels

# -- error messages --------------------------------------------------------------------------------

MAX_LISTED = 10  # offending values named in one error message (the rest are counted)
MAX_QUOTED_CHARS = 64  # characters of one client value quoted in an error message


def quote(value: object) -> str:
    """repr(value), shortened so that an error message about a huge value stays small."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[:MAX_QUOTED_CHARS - 3]}...({len(text)} chars)"


def listing(values: Iterable[object], limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """'a, b, c' for at most `limit` values, then 'and N more'."""
    values = list(values)
    shown = sep.join(str(v)[:MAX_QUOTED_CHARS * 2] for v in values[:limit])
    return shown if len(values) <= limit else f"{shown} and {len(values) - limit} more"


# -- integers ----------------------------------------------------------------------------------------

def check_int_range(field: str, value: object, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi]; bools, floats and strings are not integers here."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise field_error(field, f"expected an integer, got {quote(value)}")
    if not lo <= value <= hi:
        raise field_error(field, f"must be in [{lo}, {hi}], got {value}")
    return value


def check_id(field: str, value: object) -> int:
    """A record id: a positive signed 64-bit integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise field_error(field, f"expected a positive id, got {quote(value)}")
    return check_int_range(field, value, 1, MAX_INT64)


_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_id(field: str, text: str) -> int:
    """An id written as text (GetLineage): ASCII digits only, within int64."""
    if not isinstance(text, str) or not _DIGITS.fullmatch(text):
        raise field_error(field, f"ids are positive integers of at most 19 digits, got {quote(text)}")
    return check_id(field, int(text))


def check_count(field: str, values: Sized, maximum: int, what: str = "entries") -> None:
    if len(values) > maximum:
        raise field_error(field, f"{len(values)} {what}; at most {maximum}")



# -- names -----------------------------------------------------------------------------------------

def _check_pattern(field: str, value: object, pattern: re.Pattern, what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise field_error(field, f"{what} {quote(value)} must be {rule}")
    return value


def check_name(field: str, value: object, what: str = "name") -> str:
    """Pool, data set and task names."""
    return _check_pattern(field, value, NAME, what, "1-63 lower-case letters, digits, '.', '_' or '-'")


def check_version(field: str, value: object) -> str:
    return _check_pattern(field, value, VERSION, "version", "1-64 letters, digits, '.', '_', '+' or '-'")


def check_alias(field: str, value: object) -> str:
    return _check_pattern(field, value, ALIAS, "alias",
                          "1-63 characters: a lower-case letter, then letters, digits, '.', '_' or '-'")


def check_format(field: str, value: object) -> str:
    return _check_pattern(field, value, FORMAT, "format", "1-32 lower-case letters, digits, '.', '_' or '-'")


def check_job_id(field: str, value: object) -> str:
    return _check_pattern(field, value, JOB_ID, "job id", "1-64 letters, digits, '.', '_' or '-'")


def check_sha256(field: str, value: object) -> str:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise field_error(field, f"expected 64 lower-case hex digits, got {quote(value)}")
    return value


def parse_pool_ref(field: str, ref: object) -> tuple[str, str | None]:
    """"name", "name@version" or "name@alias" -> (name, tag or None)."""
    if not isinstance(ref, str) or not ref:
        raise field_error(field, "expected NAME, NAME@VERSION or NAME@ALIAS")
    name, sep, tag = ref.partition("@")
    check_name(field, name, "pool name")
    if sep:
        if not tag:
            raise field_error(field, f"{quote(ref)}: nothing after '@' (expected NAME@VERSION or NAME@ALIAS)")
        check_version(field, tag)
        return name, tag
    return name, None


def check_label(field: str, value: object) -> str:
    """A free-form display name: 1-256 printable characters, not only spaces."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise field_error(field, f"must be 1-{MAX_LABEL_CHARS} printable characters, got {quote(value)}")
    return value


def check_text(field: str, value: object, max_chars: int, *, multiline: bool = False) -> str:
    """Free text (descriptions, job messages): bounded, without NUL or other control characters
    (tabs and newlines only where `multiline`)."""
    if not isinstance(value, str):
        raise field_error(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise field_error(field, f"{len(value)} characters; at most {max_chars}")
    allowed = "\n\t\r" if multiline else ""
    bad = next((ch for ch in value if not ch.isprintable() and ch not in allowed and ch != " "), None)
    if bad is not None:
        raise field_error(field, f"contains the control character {bad!r} (U+{ord(bad):04X})")
    return value


# -- class names -----------------------------------------------------------------------------------

def class_key(name: str) -> str:
    """The look-up key of a class name or reference: surrounding spaces dropped, canonical (NFC)
    composition, case folded. Stored class names are NFC already, so for them this is their
    case-folded name."""
    return unicodedata.normalize("NFC", name.strip()).casefold()


def check_class_name(field: str, name: object) -> str:
    """A class name in a hierarchy: 1-128 printable characters, no surrounding spaces, in NFC
    (a class then has one spelling; a request in another normalization still finds it)."""
    if not isinstance(name, str) or not name:
        raise field_error(field, f"class names must be non-empty text, got {quote(name)}")
    if len(name) > MAX_CLASS_NAME_CHARS:
        raise field_error(field, f"class name {quote(name)} has {len(name)} characters; at most "
                                 f"{MAX_CLASS_NAME_CHARS}")
    if not name.isprintable():
        raise field_error(field, f"class name {quote(name)} contains control or separator characters")
    if name != name.strip():
        raise field_error(field, f"class name {quote(name)} starts or ends with spaces")
    if not unicodedata.is_normalized("NFC", name):
        raise field_error(field, f"class name {quote(name)} is not in Unicode NFC form "
                                 f"(write it as {unicodedata.normalize('NFC', name)!r})")
    if len(name.casefold()) > MAX_CLASS_KEY_CHARS:
        raise field_error(field, f"class name {quote(name)} is longer than {MAX_CLASS_KEY_CHARS} characters "
                                 "once case-folded")
    return name


def check_class_names(field: str, names: Sequence[object]) -> None:
    """The class list of a hierarchy: count, each name, and the bytes they take together."""
    if not names:
        raise field_error(field, "must not be empty")
    check_count(field, names, MAX_CLASSES, "classes")
    total = 0
    for name in names:
        total += len(check_class_name(field, name).encode())
    if total > MAX_CLASS_NAMES_BYTES:
        raise field_error(field, f"the class names take {total} bytes of UTF-8; at most {MAX_CLASS_NAMES_BYTES}")


def check_ref(field: str, ref: object) -> str:
    """One class or task reference of a request (a name or an id)."""
    if not isinstance(ref, str):
        raise field_error(field, f"expected text, got {type(ref).__name__}")
    if len(ref) > MAX_REF_CHARS:
        raise field_error(field, f"{quote(ref)} has {len(ref)} characters; at most {MAX_REF_CHARS}")
    if not ref.replace(" ", "").isprintable():
        raise field_error(field, f"{quote(ref)} contains control or separator characters")
    return ref


def check_refs(field: str, refs: Sequence[object], maximum: int) -> None:
    check_count(field, refs, maximum)
    for ref in refs:
        check_ref(field, ref)


def ascii_id(ref: str) -> int | None:
    """The class id a reference spells with ASCII digits (at most 10), else None. Other digits
    ("²", "٣") are names, never ids: int() would reject or reinterpret them."""
    text = ref.strip()
    return int(text) if len(text) <= 10 and text.isascii() and text.isdigit() else None


# -- JSON --------------------------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"[^"]*"')  # once escaped backslashes and quotes are gone
# Every byte but the brackets goes; openings become +1 and closings -1 (as int8).
_BRACKET_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff"), bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(text: str, max_depth: int) -> bool:
    """Whether the brackets of JSON text nest deeper than `max_depth` or do not balance: byte
    operations and one cumulative sum, linear in the text and never a recursion. Valid JSON within
    the depth always passes."""
    import numpy as np  # here, not at the top: the slim client distribution imports this module without numpy

    data = text.encode("utf-8", "surrogatepass").replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = np.frombuffer(_JSON_STRING.sub(b"", data).translate(*_BRACKET_STEPS), dtype=np.int8)
    if not steps.size:
        return False
    depth = np.cumsum(steps, dtype=np.int64)
    return bool(depth.max() > max_depth or depth.min() < 0 or depth[-1] != 0)


def brackets_too_deep(text: str, max_depth: int) -> bool:
    """Whether brackets may nest deeper than `max_depth` in text of another syntax (YAML): every
    bracket counts, quoted or not, so this errs on the side of refusing. Linear, no recursion."""
    import numpy as np

    steps = np.frombuffer(text.encode("utf-8", "surrogatepass").translate(*_BRACKET_STEPS), dtype=np.int8)
    if not steps.size:
        return False
    depth = np.cumsum(steps, dtype=np.int64)
    return bool(depth.max() - min(int(depth.min()), 0) > max_depth)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def served_json(value: Any) -> str:
    """The text a JSON field is served as (and measured by): sorted keys, "" for an empty value."""
    return json.dumps(value, sort_keys=True) if value else ""


def check_json_value(field: str, value: Any, *, max_bytes: int = MAX_JSON_BYTES,
                     max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON value already in memory: plain JSON types, finite numbers, no NUL in any string,
    nested at most `max_depth`, and at most `max_bytes` once served. Walks without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise field_error(field, f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    if not isinstance(k, str):
                        raise field_error(field, f"object keys must be strings, got {quote(k)}")
                    if "\x00" in k:
                        raise field_error(field, "contains a NUL character")
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise field_error(field, "contains a NUL character")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise field_error(field, f"numbers must be finite, got {item}")
        elif item is not None and not isinstance(item, int | bool):
            raise field_error(field, f"not a JSON value: {type(item).__name__}")
    size = len(served_json(value).encode())
    if size > max_bytes:
        raise field_error(field, f"{size} bytes as stored; at most {max_bytes}")
    return value


def check_json_object(field: str, value: Any, *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    if not isinstance(value, dict):
        raise field_error(field, f"expected a JSON object, got {type(value).__name__}")
    return check_json_value(field, value, max_bytes=max_bytes)


def parse_json(field: str, text: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
               object_only: bool = True) -> Any:
    """A request's JSON field: "" means {}; otherwise valid JSON (a JSON object when
    `object_only`) within the size and depth caps. The depth is checked by a linear scan before
    the parser runs, so deep input never makes it recurse."""
    if not text:
        return {}
    if not isinstance(text, str):
        raise field_error(field, f"expected JSON text, got {type(text).__name__}")
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise field_error(field, f"{len(text.encode())} bytes; at most {max_bytes}")
    if json_too_deep(text, max_depth):
        raise field_error(field, f"not valid JSON, or nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise field_error(field, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, integers of thousands of digits
        raise field_error(field, f"not valid JSON ({str(e)[:200]})") from None
    if object_only and not isinstance(value, dict):
        raise field_error(field, f"expected a JSON object, got {type(value).__name__}")
    return check_json_value(field, value, max_bytes=max_bytes, max_depth=max_depth)


# -- page tokens -------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_BAD_TOKEN = "not a token from a previous response"


def check_page_size(value: object, default: int, maximum: int, field: str = "page_size") -> int:
    """0 means `default`; larger values are capped at `maximum` (pages are also cut by bytes)."""
    check_int_range(field, value, 0, MAX_INT32)
    return default if value == 0 else min(value, maximum)  # type: ignore[operator]


def _fingerprint(query: object) -> str:
    return hashlib.sha256(repr(query).encode()).hexdigest()[:16]


def encode_page_token(offset: int, query: object) -> str:
    """An opaque token for the page at `offset` of the request whose filters are `query`."""
    raw = json.dumps({"o": offset, "q": _fingerprint(query)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: object, field: str = "page_token") -> int:
    """The offset of a token issued by `encode_page_token` for the same filters (0 for "").
    Anything else is InvalidArgument: the token is checked field by field, never trusted."""
    if not token:
        return 0
    if not isinstance(token, str) or len(token) > MAX_PAGE_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise field_error(field, _BAD_TOKEN)
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        raise field_error(field, _BAD_TOKEN) from None
    if not isinstance(data, dict) or set(data) != {"o", "q"}:
        raise field_error(field, _BAD_TOKEN)
    offset, fp = data["o"], data["q"]
    if type(offset) is not int or not 0 <= offset <= MAX_PAGE_OFFSET or not isinstance(fp, str):
        raise field_error(field, _BAD_TOKEN)
    if fp != _fingerprint(query):
        raise field_error(field, "was issued for a request with different filters")
    return offset


# -- network configs (before any module is built) ----------------------------------------------------

def _check_config_ints(field: str, config: Mapping, caps: Mapping[str, int]) -> None:
    for key, cap in caps.items():
        if key in config:
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise field_error(field, f"{key} must be an integer, got {quote(value)}")
            if not 1 <= value <= cap:
                raise field_error(field, f"{key} must be in [1, {cap}], got {value}")


def check_network_config(field: str, config: Mapping) -> Mapping:
    """An oracle's or library's Wide-ResNet config: the sizes it sets must be within the caps
    (keys it leaves out take the engine's defaults, which are)."""
    if not isinstance(config, Mapping):
        raise field_error(field, f"expected a JSON object, got {type(config).__name__}")
    _check_config_ints(field, config, {"depth": MAX_WRN_DEPTH, "width": MAX_WRN_WIDTH,
                                       "in_channels": MAX_IN_CHANNELS, "num_classes": MAX_CLASSES})
    return config


def check_expert_config(field: str, config: Mapping) -> Mapping:
    """An expert's config: width, blocks, input channels and classes within the caps."""
    if not isinstance(config, Mapping):
        raise field_error(field, f"expected a JSON object, got {type(config).__name__}")
    _check_config_ints(field, config, {"in_channels": MAX_EXPERT_IN_CHANNELS, "width": MAX_EXPERT_WIDTH,
                                       "blocks": MAX_EXPERT_BLOCKS, "num_classes": MAX_CLASSES})
    return config
