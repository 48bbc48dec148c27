"""The limits module and the engine's use of it: linear hierarchy checks, bounded JSON, strict
page tokens and names, capped network configs."""

from __future__ import annotations

import base64
import json
import time

import pytest

from poe.engine import hierarchy, limits, names
from poe.engine.errors import InvalidArgument
from poe.engine.nets import ExpertConfig, WRNConfig
from poe.engine.pool import expert_config_from_dict, wrn_config_from_dict


def _big_hierarchy(n: int, tasks: int = 1000) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    classes = tuple(f"class {i:05d}" for i in range(n))
    per = n // tasks
    return classes, {f"t{j:04d}": tuple(range(j * per, (j + 1) * per)) for j in range(tasks)}


def test_hierarchy_validation_is_linear():
    # It was quadratic: 3.4 s for 8,000 classes and 11.3 s for 16,000 (about 0.05 s now).
    classes, tasks = _big_hierarchy(16_000)
    t0 = time.perf_counter()
    h = hierarchy.Hierarchy("big", 1, classes, tasks)
    back = hierarchy.from_dict(h.to_dict())
    assert back.resolve_classes(list(classes)) == list(range(16_000))
    assert back.covering_tasks(range(16_000)) == list(tasks)
    assert time.perf_counter() - t0 < 1.0


def test_hierarchy_limits():
    classes, tasks = _big_hierarchy(limits.MAX_CLASSES + 2, 2)
    with pytest.raises(InvalidArgument, match="classes: 32770 classes; at most 32768"):
        hierarchy.Hierarchy("big", 1, classes, tasks)
    classes = tuple(f"c{i}" for i in range(limits.MAX_TASKS + 1))
    with pytest.raises(InvalidArgument, match="tasks: 1025 tasks; at most 1024"):
        hierarchy.Hierarchy("big", 1, classes, {f"t{i}": (i,) for i in range(len(classes))})
    long_names = tuple(f"{i:05d}" + "x" * 120 for i in range(5000))  # 625 KB of names
    with pytest.raises(InvalidArgument, match="bytes of UTF-8"):
        hierarchy.Hierarchy("big", 1, long_names, {"t": tuple(range(5000))})


@pytest.mark.parametrize("name", ["Cat\n", " Cat", "Cat ", "Ca\tt", "Cafe\u0301", "", "x" * 129, "a\x00",
                                  "\u00a0", "ΐ" * 100])
def test_bad_class_names(name):
    with pytest.raises(InvalidArgument, match="classes"):
        hierarchy.Hierarchy("x", 1, (name, "other"), {"t": (0, 1)})


def test_class_lookups_fold_case_and_normalization_consistently():
    h = hierarchy.Hierarchy("x", 1, ("Café", "Straße", "²", "7"), {"t": (0, 1, 2, 3)})
    assert h.resolve_classes(["CAFE\u0301", "strasse", " ² ", "7", "1"]) == [0, 1, 2, 3]
    with pytest.raises(InvalidArgument, match="duplicate class names"):
        hierarchy.Hierarchy("x", 1, ("Straße", "STRASSE"), {"t": (0, 1)})
    with pytest.raises(InvalidArgument) as err:  # a digit that is not ASCII is a name, never an id
        h.resolve_classes(["³", "٣"])
    assert "'³'" in str(err.value) and "'٣'" in str(err.value)


def test_unknown_class_messages_stay_short():
    classes, tasks = _big_hierarchy(16_000)
    h = hierarchy.Hierarchy("big", 1, classes, tasks)
    with pytest.raises(InvalidArgument) as err:
        h.resolve_classes([f"nope {i}" for i in range(20_000)])
    assert len(str(err.value)) < 2000 and "19990 more" in str(err.value) and "15990 more" in str(err.value)


def test_plan_treats_odd_digits_as_names(random_pool):
    from poe.engine.compose import plan

    with pytest.raises(InvalidArgument, match="classes: .*'²'"):
        plan(random_pool, ["²"])
    with pytest.raises(InvalidArgument, match="classes"):
        plan(random_pool, ["9" * 5000])
    assert plan(random_pool, ["8"]).class_names == ("Bag",)


def test_hierarchy_files_nested_too_deep():
    with pytest.raises(InvalidArgument, match="not valid YAML or JSON"):
        hierarchy.loads("{" + '"a": {' * 100_000 + "}" * 100_001)
    with pytest.raises(InvalidArgument, match="not valid YAML or JSON"):
        hierarchy.loads("a: " + "[" * 5_000)


# -- JSON ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("[" * 30_000 + "]" * 30_000, "nested deeper than 32"),
    ('{"a":' * 10_000 + "1" + "}" * 10_000, "nested deeper than 32"),
    ('{"a": [' + "[" * 40 + "]" * 40 + "]}", "nested deeper than 32"),
    ('{"a": NaN}', "NaN"),
    ('{"a": 1e400}', "finite"),
    ('{"a": "\\u0000"}', "NUL"),
    ('{"\\u0000": 1}', "NUL"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"a": ', "not valid JSON"),
    ('{"a": "' + "é" * 20_000 + '"}', "as stored"),  # 40 KB of UTF-8, 120 KB served as \u00e9
    ('{"a": "' + "x" * 70_000 + '"}', "bytes; at most 65536"),
])
def test_parse_json_refuses(text, reason):
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument, match=reason) as err:
        limits.parse_json("info_json", text)
    assert err.value.field == "info_json" and str(err.value).startswith("info_json: ")
    assert time.perf_counter() - t0 < 0.5


def test_parse_json_accepts_and_depth_scan_ignores_strings():
    text = json.dumps({"a": "[[[[" * 50 + '\\"{{{', "b": [[1, 2], {"c": "\\\\"}], "é": None})
    assert limits.parse_json("f", text) == json.loads(text)
    assert limits.parse_json("f", "") == {}
    nested = 1
    for i in range(limits.MAX_JSON_DEPTH - 1):
        nested = [nested] if i % 2 else {"k": nested}
    assert limits.parse_json("f", json.dumps({"n": nested}))
    with pytest.raises(InvalidArgument, match="deeper"):
        limits.parse_json("f", json.dumps({"n": [nested]}))


def test_check_json_value_walks_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="deeper"):
        limits.check_json_value("params_json", {"d": deep})
    with pytest.raises(InvalidArgument, match="not a JSON value"):
        limits.check_json_value("params_json", {"d": object()})


# -- page tokens, ids, names ---------------------------------------------------------------------------

def _token(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_page_tokens_round_trip_and_forgeries_are_refused():
    query = ("jobs", None)
    token = limits.encode_page_token(200, query)
    assert limits.decode_page_token(token, query) == 200 and limits.decode_page_token("", query) == 0
    with pytest.raises(InvalidArgument, match="different filters"):
        limits.decode_page_token(token, ("jobs", "running"))
    fp = json.loads(base64.urlsafe_b64decode(token + "=="))["q"]
    for bad in (_token({"o": 1e30, "q": fp}), _token({"o": -1, "q": fp}), _token({"o": 2 ** 31, "q": fp}),
                _token({"o": "5", "q": fp}), _token({"o": True, "q": fp}), _token({"o": 1, "q": fp, "x": 1}),
                _token([1, 2]), _token({"o": 1, "q": 5}), "@@", token + "\n", "A" * 1000, "A"):
        with pytest.raises(InvalidArgument, match="page_token: not a token"):
            limits.decode_page_token(bad, query)


def test_ids_must_fit_int64():
    assert limits.parse_id("id", "9223372036854775807") == 2 ** 63 - 1
    for bad in ("9223372036854775808", "99999999999999999999999", "0", "-1", "1e3", "٣", " 1", "1\n"):
        with pytest.raises(InvalidArgument, match="id: "):
            limits.parse_id("id", bad)
    for bad in (2 ** 63, 0, -5, True, 1.0, "3"):
        with pytest.raises(InvalidArgument, match="library_id: "):
            limits.check_id("library_id", bad)


@pytest.mark.parametrize("pattern, good", [(names.NAME, "fm"), (names.VERSION, "1.0"), (names.ALIAS, "stable"),
                                           (names.FORMAT, "onnx"), (names.JOB_ID, "job-1"),
                                           (names.SHA256, "0" * 64)])
def test_name_patterns_refuse_a_trailing_newline(pattern, good):
    assert pattern.match(good) and pattern.fullmatch(good)
    assert not pattern.match(good + "\n") and not pattern.match(good + "\r\n")


def test_name_checks_quote_huge_values_briefly():
    with pytest.raises(InvalidArgument) as err:
        limits.check_name("name", "X" * 1_000_000)
    assert len(str(err.value)) < 200


# -- network configs ----------------------------------------------------------------------------------

def test_network_configs_are_capped_before_anything_is_built():
    t0 = time.perf_counter()
    for cfg in ({"in_channels": 32, "width": 4096}, {"in_channels": 32, "blocks": 1000},
                {"in_channels": 1 << 20}, {"in_channels": 32, "width": "16"}):
        with pytest.raises(InvalidArgument, match="bad expert config"):
            expert_config_from_dict(cfg)
    with pytest.raises(InvalidArgument, match="unknown keys"):
        expert_config_from_dict({"in_channels": 32, "wdith": 16})
    for cfg in ({"depth": 1000}, {"width": 64}, {"in_channels": 1000}, {"num_classes": 10 ** 9},
                {"mean": "x"}):
        with pytest.raises(InvalidArgument, match="bad network config"):
            wrn_config_from_dict(cfg)
    with pytest.raises(InvalidArgument, match="width must be in"):
        ExpertConfig(32, 4096)
    with pytest.raises(InvalidArgument, match="depth must be in"):
        WRNConfig(depth=1000)
    assert time.perf_counter() - t0 < 0.5  # nothing was built
    assert expert_config_from_dict({"in_channels": 32, "width": 16, "blocks": 2, "num_classes": 2}).width == 16
    assert wrn_config_from_dict({"depth": 16, "width": 4, "mean": [0.3], "std": [0.4]}).width == 4
