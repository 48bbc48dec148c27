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
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from poe.engine.errors import InvalidArgument, NotFound
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

    # -- look-ups ------------------------------------------------------------------------------
    def class_id(self, ref: str | int) -> int:
        ids = self.resolve_classes([ref])
        return ids[0]

    def resolve_classes(self, refs: Iterable[str | int]) -> list[int]:
        """Class ids for names (case-insensitive) or ids, sorted and without duplicates.

        Raises InvalidArgument naming every reference that matches no class.
        """
        by_name = {c.casefold(): i for i, c in enumerate(self.classes)}
        ids, unknown = set(), []
        for ref in refs:
            if isinstance(ref, bool):
                unknown.append(str(ref))
            elif isinstance(ref, int):
                (ids.add(ref) if 0 <= ref < len(self.classes) else unknown.append(str(ref)))
            else:
                key = str(ref).strip()
                if key.casefold() in by_name:
                    ids.add(by_name[key.casefold()])
                elif key.isdigit() and int(key) < len(self.classes):
                    ids.add(int(key))
                else:
                    unknown.append(repr(key))
        if unknown:
            raise InvalidArgument(f"unknown classes for {self.dataset}: {', '.join(unknown)} "
                                  f"(known: {', '.join(self.classes)})")
        return sorted(ids)

    def resolve_tasks(self, names: Iterable[str]) -> list[str]:
        by_name = {t.casefold(): t for t in self.tasks}
        found, unknown = [], []
        for n in names:
            t = by_name.get(str(n).strip().casefold())
            (found.append(t) if t else unknown.append(repr(n)))
        if unknown:
            raise InvalidArgument(f"unknown primitive tasks: {', '.join(unknown)} (known: {', '.join(self.tasks)})")
        return [t for t in self.tasks if t in found]

    def task_of(self, class_id: int) -> str:
        for name, ids in self.tasks.items():
            if class_id in ids:
                return name
        raise NotFound(f"class {class_id} is in no task")

    def covering_tasks(self, class_ids: Iterable[int]) -> list[str]:
        """The tasks that hold the given classes, in hierarchy order."""
        wanted = {self.task_of(c) for c in class_ids}
        return [t for t in self.tasks if t in wanted]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "dataset": self.dataset, "version": self.version,
                "classes": list(self.classes),
                "tasks": {t: [self.classes[i] for i in ids] for t, ids in self.tasks.items()}}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def validate(h: Hierarchy) -> None:
    if not h.classes:
        raise InvalidArgument("hierarchy: no classes")
    folded = [c.casefold() for c in h.classes]
    dupes = sorted({c for c in h.classes if folded.count(c.casefold()) > 1})
    if dupes:
        raise InvalidArgument(f"hierarchy: duplicate class names: {', '.join(dupes)}")
    if not h.tasks:
        raise InvalidArgument("hierarchy: no tasks")
    seen: dict[int, str] = {}
    twice = []
    for task, ids in h.tasks.items():
        if not NAME.match(task):
            raise InvalidArgument(f"hierarchy: task name {task!r} must be lower-case letters, digits, '.', '_' or '-'")
        if not ids:
            raise InvalidArgument(f"hierarchy: task {task!r} has no classes")
        for i in ids:
            if i in seen:
                twice.append(f"{h.classes[i]} ({seen[i]}, {task})")
            seen[i] = task
    if twice:
        raise InvalidArgument(f"hierarchy: classes in more than one task: {'; '.join(twice)}")
    missing = [c for i, c in enumerate(h.classes) if i not in seen]
    if missing:
        raise InvalidArgument(f"hierarchy: classes in no task: {', '.join(missing)}")


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
    index = {c.casefold(): i for i, c in enumerate(classes)}
    tasks, unknown = {}, []
    for task, names in d["tasks"].items():
        if not isinstance(names, list):
            raise InvalidArgument(f"hierarchy: task {task!r} must list class names")
        ids = []
        for n in names:
            i = index.get(str(n).casefold())
            (unknown.append(f"{n} (task {task})") if i is None else ids.append(i))
        tasks[str(task)] = tuple(ids)
    if unknown:
        raise InvalidArgument(f"hierarchy: tasks name classes not in 'classes': {', '.join(unknown)}")
    try:
        version = int(d.get("version", 1))
    except (TypeError, ValueError):
        raise InvalidArgument("hierarchy: 'version' must be an integer") from None
    return Hierarchy(str(d["dataset"]), version, tuple(classes), tasks)


def loads(text: str, source: str = "hierarchy") -> Hierarchy:
    try:
        d = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InvalidArgument(f"{source}: not valid YAML or JSON ({str(e).splitlines()[0]})") from None
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
