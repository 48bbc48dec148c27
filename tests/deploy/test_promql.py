"""metric_names_in and label_names_in: the tokenizer that tells which metrics and labels a PromQL
expression reads; fill_dashboard_variables."""

from __future__ import annotations

import pytest
from promql import (
    PromQLTokenError,
    base_metric,
    fill_dashboard_variables,
    label_names_in,
    metric_names_in,
    unknown_metrics,
)


@pytest.mark.parametrize(("expr", "names"), [
    ("up", {"up"}),
    ('up{job=~"poe-(registry|composer)"} == 0', {"up"}),
    ("histogram_quantile(0.99, sum by (namespace, le) (rate(poe_compose_duration_seconds_bucket[5m]))) > 0.25",
     {"poe_compose_duration_seconds_bucket"}),
    ("sum(rate(a_total[$__rate_interval])) without (pod, instance) / on (job) group_left (team) b",
     {"a_total", "b"}),
    ('sum by (grpc_code) (rate(poe_compose_requests_total{namespace=~"$namespace",grpc_code!="OK"}[5m]))',
     {"poe_compose_requests_total"}),
    # Label names and values, strings and keywords are not metrics.
    ('label_replace(x, "dst", "$1", "src", "(.*)") and ignoring (le) y unless bool z',
     {"x", "y", "z"}),
    ('{__name__="renamed_metric", job="j"}', {"renamed_metric"}),
    ("a offset 5m + b offset -1h30m + c @ 1609746000 + d @ start()", {"a", "b", "c", "d"}),
    ("max_over_time(m[1h:5m]) * 1e3 + Inf - NaN + 0x1f", {"m"}),
    ("sum(x) by (le) + count_values(\"v\", y) + topk(3, w) + quantile(0.5, q)", {"x", "y", "w", "q"}),
    ("absent(up{job=\"poe-registry\"}) or absent(up{job='poe-composer'})", {"up"}),
    ("rate(ns:metric:rate5m[${window}])", {"ns:metric:rate5m"}),
])
def test_metric_names_in(expr, names):
    assert metric_names_in(expr) == names


def test_unknown_metrics_and_histogram_suffixes():
    exported = {"poe_compose_duration_seconds", "poe_compose_requests_total"}
    expr = "rate(poe_compose_duration_seconds_sum[5m]) / rate(poe_compose_duration_seconds_count[5m]) + up"
    assert unknown_metrics(expr, exported) == set()
    assert unknown_metrics("rate(poe_compose_requests[5m])", exported) == {"poe_compose_requests"}
    assert unknown_metrics("up", exported, also=()) == {"up"}
    assert base_metric("poe_compose_duration_seconds_bucket", exported) == "poe_compose_duration_seconds"
    assert base_metric("other_bucket", exported) is None


def test_rejects_characters_promql_does_not_have():
    with pytest.raises(PromQLTokenError):
        metric_names_in("rate(x[5m]) ; drop")


@pytest.mark.parametrize(("expr", "labels"), [
    ('up{job=~"poe-(registry|composer)"} == 0', {"job"}),
    ('sum by (namespace, le) (rate(x{grpc_code="OK", pod=~"$pod"}[5m])) and on (namespace) y',
     {"namespace", "le", "grpc_code", "pod"}),
    ('sum(x) without (instance) / ignoring (a) group_left (b) y{__name__="z"}', {"instance", "a", "b"}),
    ('label_replace(x{k!~"v"}, "dst", "$1", "src", "(.*)")', {"k"}),  # label_replace's arguments are strings
])
def test_label_names_in(expr, labels):
    assert label_names_in(expr) == labels


def test_fill_dashboard_variables():
    expr = 'rate(x{namespace=~"$namespace",pod=~"$pod"}[$__rate_interval])'
    assert fill_dashboard_variables(expr) == 'rate(x{namespace=~".*",pod=~".*"}[5m])'
    filled = fill_dashboard_variables(expr, namespace="poe", rate_interval="1m")
    assert filled == 'rate(x{namespace=~"poe",pod=~".*"}[1m])'
    with pytest.raises(ValueError, match="variable is left"):
        fill_dashboard_variables('x{job="$job"}')
