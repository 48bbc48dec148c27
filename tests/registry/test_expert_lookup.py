"""Registering an expert looks its task up by name: the SQL it runs does not grow with the size of
the hierarchy (on SQLite and on PostgreSQL)."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import event

from poe.engine.errors import InvalidArgument, NotFound
from poe.engine.hierarchy import Hierarchy
from poe_services.registry import entities as e


def blob(content: str) -> e.Blob:
    return e.Blob(hashlib.sha256(content.encode()).hexdigest(), len(content), e.SAFETENSORS)


def register(store, tasks: int) -> int:
    """A data set with `tasks` tasks of two classes; returns its library's id."""
    name = f"wide-{tasks}"
    store.add_hierarchy(Hierarchy(name, 1, tuple(f"{name}-c{j}" for j in range(2 * tasks)),
                                  {f"t{j}": (2 * j, 2 * j + 1) for j in range(tasks)}))
    lib, _ = store.add_library(e.LibrarySpec(f"{name}/library", name, {}), blob(f"{name}/library"))
    return lib.id


def sql_of(store, fn) -> tuple[int, int]:
    """(statements, bound parameters) that fn() sends to the database."""
    sent = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(len(parameters or ()))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        fn()
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    return len(sent), sum(sent)


def test_expert_registration_does_not_read_the_whole_hierarchy(store):
    small, large = register(store, 4), register(store, 300)
    costs = {}
    for lib_id, tasks in ((small, 4), (large, 300)):
        spec = e.ExpertSpec(lib_id, 1, "t3", (6, 7), {"num_classes": 2}, 100, 0.5)
        new = sql_of(store, lambda spec=spec, tasks=tasks: store.add_expert(spec, blob(f"expert-{tasks}")))
        again = sql_of(store, lambda spec=spec, tasks=tasks: store.add_expert(spec, blob(f"expert-{tasks}")))
        costs[tasks] = (new, again)
        expert, created = store.add_expert(spec, blob(f"expert-{tasks}"))
        assert not created and expert.task == "t3" and expert.class_names == (f"wide-{tasks}-c6", f"wide-{tasks}-c7")
    assert costs[300] == costs[4]


def test_expert_registration_errors_are_unchanged(store):
    lib_id = register(store, 3)
    with pytest.raises(InvalidArgument, match=r"^task: hierarchy wide-3 v1 has no task 'nope' \(tasks: t0, t1, t2\)"):
        store.add_expert(e.ExpertSpec(lib_id, 1, "nope", (0, 1), {}), blob("x"))
    with pytest.raises(NotFound, match="^hierarchy_version: data set 'wide-3' has no hierarchy version 2"):
        store.add_expert(e.ExpertSpec(lib_id, 2, "t0", (0, 1), {}), blob("x"))
    with pytest.raises(InvalidArgument, match=r"^class_ids: task 't1' has classes \[2, 3\], got \[2, 5\]"):
        store.add_expert(e.ExpertSpec(lib_id, 1, "t1", (2, 5), {}), blob("x"))
