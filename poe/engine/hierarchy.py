"""Hierarchies: a data set's classes grouped into primitive tasks (one expert each).

File format (YAML or JSON), `format: poe.hierarchy/v1`::

    dataset: fashion-mnist
    version: 1
    classes: [names in label order]
    tasks: {task-name: [class names], ...}

Every class must sit in exactly one task. Class look-ups are case-insensitive and also accept
class ids (ints or digit strings).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from poe.engine import limits
from poe.engine.errors import InvalidArgument, NotFound, field_error
from poe.engine.names import NAME

FORMAT = "poe.hierarchy/v1"


@dataclass(frozen=True)
class Hierarchy:
    dataset: str
    version: int
    classes: tuple[str, ...]  # label order
    tasks: dict[str, tuple[int, ...]]  # task name -> class ids, in file order

    def __post_init__(self) -> None:
        validate(self)

    # -- indexes, built once per hierarchy (a frozen dataclass may still cache in __dict__) --------
    @cached_property
    def _class_index(self) -> dict[str, int]:
        return {limits.class_key(c): i for i, c in enumerate(self.classes)}

    @cached_property
    def _task_index(self) -> dict[str, str]:
        return {t.casefold(): t for t in self.tasks}

    @cached_property
    def _task_of_class(self) -> dict[int, str]:
        return {i: name for name, ids in self.tasks.items() for i in ids}

    # -- look-ups ------------------------------------------------------------------------------
    def class_id(self, ref: str | int) -> int:
        ids = self.resolve_classes([ref])
        return ids[0]

    def resolve_classes(self, refs: Iterable[str | int]) -> list[int]:
        """Class ids for names (case-insensitive, any Unicode normalization) or ids, sorted and
        without duplicates.

        Raises InvalidArgument naming the references that match no class (the first few of them).
        """
        ids, unknown = set(), []
        for ref in refs:
            if isinstance(ref, bool):
                unknown.append(str(ref))
            elif isinstance(ref, int):
                (ids.add(ref) if 0 <= ref < len(self.classes) else unknown.append(str(ref)))
            else:
                key = str(ref)
                found = self._class_index.get(limits.class_key(key))
                if found is None:
                    number = limits.ascii_id(key)
                    found = number if number is not None and number < len(self.classes) else None
                (ids.add(found) if found is not None else unknown.append(limits.quote(key.strip())))
        if unknown:
            raise InvalidArgument(f"unknown classes for {self.dataset}: {limits.listing(unknown)} "
                                  f"(known: {limits.listing(self.classes)})")
        return sorted(ids)

    def resolve_tasks(self, names: Iterable[str]) -> list[str]:
        found, unknown = set(), []
        for n in names:
            t = self._task_index.get(str(n).strip().casefold())
            (found.add(t) if t else unknown.append(limits.quote(n)))
        if unknown:
            raise InvalidArgument(f"unknown primitive tasks: {limits.listing(unknown)} "
                                  f"(known: {limits.listing(self.tasks)})")
        return [t for t in self.tasks if t in found]

    def task_of(self, class_id: int) -> str:
        task = self._task_of_class.get(class_id)
        if task is None:
            raise NotFound(f"class {class_id} is in no task")
        return task

    def covering_tasks(self, class_ids: Iterable[int]) -> list[str]:
        """The tasks that hold the given classes, in hierarchy order."""
        wanted = {self.task_of(c) for c in class_ids}
        return [t for t in self.tasks if t in wanted]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "dataset": self.dataset, "version": self.version,
                "classes": list(self.classes),
                "tasks": {t: [self.classes[i] for i in ids] for t, ids in self.tasks.items()}}

    def dump(self) -> str:
        import yaml  # here, not at the top: the slim client distribution has no PyYAML

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def validate(h: Hierarchy) -> None:
    """Check a hierarchy in time linear in its size (class names, tasks, every class in one task).

    Errors name the part at fault (`classes`, `version` or `tasks`) as their field."""
    limits.check_class_names("classes", h.classes)
    counts = Counter(c.casefold() for c in h.classes)
    if len(counts) != len(h.classes):
        dupes = sorted({c for c in h.classes if counts[c.casefold()] > 1})
        raise field_error("classes", f"duplicate class names (ignoring case): {limits.listing(dupes)}")
    if not isinstance(h.version, int) or isinstance(h.version, bool) or not 1 <= h.version <= limits.MAX_INT32:
        raise field_error("version", f"must be an integer in [1, {limits.MAX_INT32}], got {limits.quote(h.version)}")
    if not h.tasks:
        raise field_error("tasks", "no tasks")
    limits.check_count("tasks", h.tasks, limits.MAX_TASKS, "tasks")
    n = len(h.classes)
    seen: dict[int, str] = {}
    twice = []
    for task, ids in h.tasks.items():
        if not isinstance(task, str) or not NAME.match(task):
            raise field_error("tasks", f"task name {limits.quote(task)} must be 1-63 lower-case letters, digits, "
                                       "'.', '_' or '-'")
        if not ids:
            raise field_error("tasks", f"task {task!r} has no classes")
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise field_error("tasks", f"task {task!r} names class id {limits.quote(i)}, not in 0..{n - 1}")
            if i in seen:
                twice.append(f"{h.classes[i]} ({seen[i]}, {task})")
            seen[i] = task
    if twice:
        raise field_error("tasks", f"classes in more than one task: {limits.listing(twice, sep='; ')}")
    if len(seen) != n:
        missing = [c for i, c in enumerate(h.classes) if i not in seen]
        raise field_error("tasks", f"classes in no task: {limits.listing(missing)}")


def from_dict(d: dict) -> Hierarchy:
    if not isinstance(d, dict):
        raise InvalidArgument("hierarchy: expected a mapping at the top level")
    if d.get("format", FORMAT) != FORMAT:
        raise InvalidArgument(f"hierarchy: unsupported format {d.get('format')!r} (expected {FORMAT})")
    for key in ("dataset", "classes", "tasks"):
        if key not in d:
            raise InvalidArgument(f"hierarchy: missing field {key!r}")
    classes = d["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise InvalidArgument("hierarchy: 'classes' must be a list of non-empty names")
    if not isinstance(d["tasks"], dict):
        raise InvalidArgument("hierarchy: 'tasks' must map task names to lists of class names")
    if len(classes) > limits.MAX_CLASSES or len(d["tasks"]) > limits.MAX_TASKS:
        raise InvalidArgument(f"hierarchy: {len(classes)} classes and {len(d['tasks'])} tasks; at most "
                              f"{limits.MAX_CLASSES} classes and {limits.MAX_TASKS} tasks")
    for task, names in d["tasks"].items():
        if not isinstance(names, list):
            raise InvalidArgument(f"hierarchy: task {limits.quote(task)} must list class names")
    listed = sum(len(names) for names in d["tasks"].values())  # YAML aliases can repeat one long list
    if listed > limits.MAX_CLASSES:
        raise InvalidArgument(f"hierarchy: the tasks list {listed} classes; at most {limits.MAX_CLASSES}")
    index = {limits.class_key(c): i for i, c in enumerate(classes)}
    tasks, unknown = {}, []
    for task, names in d["tasks"].items():
        ids = []
        for n in names:
            i = index.get(limits.class_key(str(n)))
            (unknown.append(f"{str(n)[:limits.MAX_QUOTED_CHARS]} (task {task})") if i is None else ids.append(i))
        tasks[str(task)] = tuple(ids)
    if unknown:
        raise InvalidArgument(f"hierarchy: tasks name classes not in 'classes': {limits.listing(unknown)}")
    try:
        version = int(d.get("version", 1))
    except (TypeError, ValueError):
        raise InvalidArgument("hierarchy: 'version' must be an integer") from None
    return Hierarchy(str(d["dataset"]), version, tuple(classes), tasks)


def loads(text: str, source: str = "hierarchy") -> Hierarchy:
    import yaml

    try:
        if text.lstrip().startswith("{"):
            if limits.json_too_deep(text, limits.MAX_JSON_DEPTH):
                raise ValueError(f"nested deeper than {limits.MAX_JSON_DEPTH} levels")
            d = json.loads(text)
        else:  # PyYAML recurses per level of flow nesting (and is slow getting there)
            if limits.brackets_too_deep(text, limits.MAX_JSON_DEPTH):
                raise ValueError(f"brackets nested deeper than {limits.MAX_JSON_DEPTH} levels")
            d = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InvalidArgument(f"{source}: not valid YAML or JSON ({reason})") from None
    try:
        return from_dict(d)
    except InvalidArgument as e:
        raise InvalidArgument(f"{source}: {e}") from None


def load(path: str | Path) -> Hierarchy:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such hierarchy file") from None
    return loads(text, str(path))


def builtin(name: str) -> Hierarchy:
    """A hierarchy shipped with the package, e.g. `fashion-mnist`."""
    ref = resources.files("poe.engine.hierarchies") / f"{name}.yaml"
    if not ref.is_file():
        raise NotFound(f"no built-in hierarchy {name!r}")
    return loads(ref.read_text(), f"hierarchy {name}")
