import pytest

from poe.engine import hierarchy
from poe.engine.errors import InvalidArgument

CLASSES = ["a", "b", "c", "d"]


def test_builtin_fashion_mnist_is_valid():
    h = hierarchy.builtin("fashion-mnist")
    assert len(h.tasks) >= 5
    assert sorted(i for ids in h.tasks.values() for i in ids) == list(range(10))
    assert h.tasks["footwear"] == (5, 7, 9)


def test_class_lookup_is_case_insensitive_and_accepts_ids():
    h = hierarchy.builtin("fashion-mnist")
    assert h.resolve_classes(["sandal", "BAG", "t-shirt/top", 3, "9"]) == [0, 3, 5, 8, 9]


def test_unknown_classes_are_all_named():
    h = hierarchy.builtin("fashion-mnist")
    with pytest.raises(InvalidArgument) as e:
        h.resolve_classes(["Sandal", "Boots", 42])
    assert "'Boots'" in str(e.value) and "42" in str(e.value) and "Sandal," not in str(e.value).split("known")[0]


def test_class_in_two_tasks_is_named():
    with pytest.raises(InvalidArgument, match=r"more than one task: b \(t1, t2\)"):
        hierarchy.from_dict({"dataset": "x", "classes": CLASSES, "tasks": {"t1": ["a", "b"], "t2": ["b", "c", "d"]}})


def test_class_in_no_task_is_named():
    with pytest.raises(InvalidArgument, match="in no task: d"):
        hierarchy.from_dict({"dataset": "x", "classes": CLASSES, "tasks": {"t1": ["a", "b"], "t2": ["c"]}})


def test_unknown_class_in_task():
    with pytest.raises(InvalidArgument, match="not in 'classes': e \\(task t2\\)"):
        hierarchy.from_dict({"dataset": "x", "classes": CLASSES, "tasks": {"t1": ["a", "b"], "t2": ["c", "d", "e"]}})


def test_bad_format_and_missing_fields():
    with pytest.raises(InvalidArgument, match="unsupported format"):
        hierarchy.from_dict({"format": "other/v9", "dataset": "x", "classes": CLASSES, "tasks": {}})
    with pytest.raises(InvalidArgument, match="missing field 'tasks'"):
        hierarchy.from_dict({"dataset": "x", "classes": CLASSES})


def test_yaml_and_json_files_round_trip(tmp_path):
    h = hierarchy.builtin("fashion-mnist")
    (tmp_path / "h.yaml").write_text(h.dump())
    assert hierarchy.load(tmp_path / "h.yaml") == h
    import json

    (tmp_path / "h.json").write_text(json.dumps(h.to_dict()))
    assert hierarchy.load(tmp_path / "h.json") == h


def test_unparseable_file(tmp_path):
    (tmp_path / "h.yaml").write_text("tasks: [unclosed")
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        hierarchy.load(tmp_path / "h.yaml")


def test_covering_tasks_in_hierarchy_order():
    h = hierarchy.builtin("fashion-mnist")
    assert h.covering_tasks([8, 5, 0]) == ["tops", "footwear", "bags"]
