"""Run by tests/client/test_slim_client.py inside a fresh virtual environment holding only the
slim client wheel and its dependencies: `python slim_check.py TARGET POOL` calls a live server
with the blocking and the asyncio clients and prints what it got as JSON."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import sys

ABSENT = ("torch", "numpy", "yaml", "sqlalchemy", "minio", "safetensors", "poe_services")
CLASSES = ["Sandal", "Bag", "Sneaker"]


def header_summary(header) -> dict:
    return {"model_id": header.model_id, "pool": header.pool, "classes": list(header.classes),
            "class_ids": list(header.class_ids), "size": header.size, "sha256": header.sha256,
            "format": header.format, "params": header.params}


def blocking(target: str, pool: str) -> dict:
    from poe.client import Composer, RegistryClient
    from poe.engine.errors import FailedPrecondition, InvalidArgument

    with Composer(target) as composer:
        composer.wait_ready()
        result = composer.compose(classes=CLASSES, pool=pool)
        assert hashlib.sha256(result.data).hexdigest() == result.header.sha256
        assert len(result.data) == result.header.size
        described = composer.describe(classes=CLASSES, pool=pool)
        try:
            result.load()
            raise AssertionError("load() worked without torch")
        except FailedPrecondition as e:
            load_error = str(e)
        try:
            composer.compose(classes=["Spaceship"], pool=pool)
            raise AssertionError("an unknown class was composed")
        except InvalidArgument as e:
            unknown_error = str(e)
    with RegistryClient(target) as registry:
        version = registry.get_pool(pool)
    return {"compose": header_summary(result.header), "describe": header_summary(described),
            "load_error": load_error, "unknown_error": unknown_error, "pool": f"{version.name}@{version.version}"}


async def asynchronous(target: str, pool: str) -> dict:
    from poe.client.aio import AsyncComposer, AsyncRegistry
    from poe.engine.errors import InvalidArgument

    async with AsyncComposer(target) as composer:
        await composer.wait_ready()
        result = await composer.compose(classes=CLASSES, pool=pool)
        assert hashlib.sha256(result.data).hexdigest() == result.header.sha256
        described = await composer.describe(classes=CLASSES, pool=pool)
        try:
            await composer.compose(classes=["Spaceship"], pool=pool)
            raise AssertionError("an unknown class was composed")
        except InvalidArgument as e:
            unknown_error = str(e)
    async with AsyncRegistry(target) as registry:
        pools = [f"{p.name}@{p.version}" async for p in registry.list_pools()]
        version = await registry.get_pool(pool)
        resolved = await registry.resolve_classes(pool, CLASSES)
        library = await registry.download(resolved.library.blob.sha256)
    return {"compose": header_summary(result.header), "describe": header_summary(described),
            "unknown_error": unknown_error, "pools": pools, "pool": f"{version.name}@{version.version}",
            "resolved_class_ids": list(resolved.class_ids), "library_sha256": hashlib.sha256(library).hexdigest(),
            "library_blob": resolved.library.blob.sha256, "tls": composer.tls}


def main() -> None:
    target, pool = sys.argv[1], sys.argv[2]
    import poe

    print(json.dumps({"absent": [name for name in ABSENT if importlib.util.find_spec(name) is None],
                      "poe_file": poe.__file__, "blocking": blocking(target, pool),
                      "asyncio": asyncio.run(asynchronous(target, pool))}))


if __name__ == "__main__":
    main()
