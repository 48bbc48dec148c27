"""Which metrics a PromQL expression reads: a small tokenizer, no full parser.

`metric_names_in(expr)` returns the metric names an expression selects, so the dashboard and the
alert rules can be checked against the names the services really export (services/metrics.py, or a live
scrape of a running service: `unknown_metrics(expr, exported)` with the names from /metrics).

It understands what our expressions use and what PromQL allows around it: function and aggregation
calls (`rate(...)`, `sum by (le) (...)`, `sum(...) without (x)`), label lists after by / without /
on / ignoring / group_left / group_right, label matchers (`{code!="OK"}`, including
`{__name__="x"}`), range and subquery brackets (`[5m]`, `[1h:5m]`), `offset` / `@`, numbers
(`1e3`, `0x1f`, `Inf`, `NaN`), durations, string literals, and Grafana's template variables
(`$__rate_interval`, `$namespace`, `${datasource}`, `[[var]]`). Syntax errors are not its job:
`promtool check rules` judges syntax (tests/deploy runs it on the rules and on every dashboard query,
and test_real_prometheus.py evaluates them all in a real Prometheus).

`label_names_in(expr)` returns the label names an expression matches on or groups by, and
`fill_dashboard_variables(expr)` puts values in for the dashboard's Grafana variables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Keywords that are never metric names where they appear as bare words.
_BINARY_KEYWORDS = {"and", "or", "unless", "atan2", "bool"}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_LITERALS = {"inf", "nan"}
# Aggregation operators are keywords: `sum by (x) (...)` has no parenthesis right after `sum`.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                 "bottomk", "topk", "quantile", "limitk", "limit_ratio"}

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:[smhdwy]|ms)?(?:\d+(?:[smhdwy]|ms))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<lbrace>\{)
  | (?P<rbrace>\})
  | (?P<lbracket>\[)
  | (?P<rbracket>\])
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<op>[-+*/%^,@]|==|!=|<=|>=|=~|!~|<|>|=)
    """,
    re.VERBOSE,
)


class PromQLTokenError(ValueError):
    """The expression contains a character the tokenizer does not know."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLTokenError(f"unexpected {expr[pos]!r} at {pos} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _unquote(s: str) -> str:
    body = s[1:-1]
    return body if s[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def metric_names_in(expr: str) -> set[str]:
    """The metric names `expr` selects, as written (a histogram's `_bucket` suffix included)."""
    toks = _tokens(expr)
    names: set[str] = set()
    i = 0
    n = len(toks)
    while i < n:
        kind, text = toks[i]
        if kind == "lbrace":
            # Label matchers: skip them, but a `__name__` equality matcher names a metric.
            j = i + 1
            while j < n and toks[j][0] != "rbrace":
                if (toks[j] == ("ident", "__name__") and j + 2 < n and toks[j + 1] == ("op", "=")
                        and toks[j + 2][0] == "string"):
                    names.add(_unquote(toks[j + 2][1]))
                j += 1
            i = j + 1
            continue
        if kind == "lbracket":  # [5m], [1h:5m], [$__rate_interval]
            depth = 1
            j = i + 1
            while j < n and depth:
                depth += {"lbracket": 1, "rbracket": -1}.get(toks[j][0], 0)
                j += 1
            i = j
            continue
        if kind == "ident":
            low = text.lower()
            nxt = toks[i + 1] if i + 1 < n else ("", "")
            if low in _LABEL_LIST_KEYWORDS:
                # by (a, b) / on (x) / group_left (y) / group_left without a list.
                j = i + 1
                if j < n and toks[j][0] == "lparen":
                    while j < n and toks[j][0] != "rparen":
                        j += 1
                    j += 1
                i = j
                continue
            if low == "offset":  # offset 5m, offset -5m, offset $var
                j = i + 1
                if j < n and toks[j] == ("op", "-"):
                    j += 1
                i = j + 1 if j < n and toks[j][0] in ("number", "var") else j
                continue
            if nxt[0] == "lparen" or low in _AGGREGATIONS or low in _BINARY_KEYWORDS or low in _LITERALS:
                i += 1  # a function or aggregation call, an operator keyword, Inf / NaN
                continue
            names.add(text)
        i += 1
    return names


def base_metric(name: str, exported: Iterable[str]) -> str | None:
    """`name` itself or, for a histogram/summary series, its family, when `exported` has it."""
    exported = set(exported)
    if name in exported:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return name[: -len(suffix)]
    return None


def unknown_metrics(expr: str, exported: Iterable[str], also: Iterable[str] = ("up",)) -> set[str]:
    """Metric names in `expr` that are neither in `exported` (with histogram suffixes) nor in `also`."""
    allowed = set(exported) | set(also)
    return {name for name in metric_names_in(expr) if base_metric(name, allowed) is None}


def exposed_metric_names(exposition: str) -> set[str]:
    """Metric family names in a Prometheus text exposition (a /metrics body), from its TYPE lines.

    Use with `unknown_metrics(expr, exposed_metric_names(body))` against a live service: families
    appear even before their first observation (prometheus_client writes HELP/TYPE for them).
    The `NAME_created` timestamps that prometheus_client exposes as families of their own beside a
    counter or histogram NAME(_total) are left out.
    """
    names = set()
    for line in exposition.splitlines():
        m = re.match(r"#\s*TYPE\s+([A-Za-z_:][A-Za-z0-9_:]*)\s+\w+", line)
        if m:
            names.add(m.group(1))
    created = {n for n in names if n.endswith("_created") and ({n[:-8], n[:-8] + "_total"} & names)}
    return names - created


def label_names_in(expr: str) -> set[str]:
    """Label names used in matchers (`{job="x"}`) and label lists (`by (a, b)`, `on (c)`)."""
    toks = _tokens(expr)
    names: set[str] = set()
    in_braces = False
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind in ("lbrace", "rbrace"):
            in_braces = kind == "lbrace"
        elif kind == "ident" and in_braces and nxt[1] in ("=", "!=", "=~", "!~"):
            names.add(text)
        elif kind == "ident" and text.lower() in _LABEL_LIST_KEYWORDS and nxt[0] == "lparen":
            j = i + 2
            while j < len(toks) and toks[j][0] != "rparen":
                if toks[j][0] == "ident":
                    names.add(toks[j][1])
                j += 1
    return names - {"__name__"}


def fill_dashboard_variables(expr: str, namespace: str = ".*", pod: str = ".*", rate_interval: str = "5m") -> str:
    """`expr` with the dashboard's variables replaced as Grafana does; the defaults are the "All"
    values (regexes) of `$namespace` and `$pod`."""
    filled = (expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace)
              .replace("$pod", pod))
    if re.search(r"\$\w|\$\{|\[\[", filled.replace('"$1"', "")):
        raise ValueError(f"a variable is left in {filled!r}")
    return filled
