"""PoE services, installed as `poe_services` (the folder is `services/`; see pyproject.toml).

Packages: `poe_services.registry` (this issue), `poe_services.extractor`, `poe_services.composer`.
"""
