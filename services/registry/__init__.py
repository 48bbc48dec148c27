"""The registry service (`poe.v1.Registry`): SQL metadata (SQLAlchemy 2 + Alembic) and blobs.

Layers, each usable on its own:

- `entities`: plain dataclasses the store returns (never ORM rows).
- `store.RegistryStore`: the abstract metadata store, one docstring per operation;
  `sqlstore.SqlRegistryStore` implements it on SQLite and PostgreSQL (`db` holds the engine,
  the managed session and the migration helpers; `migrations/` ships the Alembic scripts).
- `core.Registry`: store + blob store: uploads (staged, verified, committed with their rows),
  verified downloads, health.
- `servicer.RegistryServicer`: the thin gRPC layer; `runtime.RegistryRuntime`: what `poe_services.host` hosts.
"""
