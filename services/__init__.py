"""PoE services, installed as `poe_services` (the folder is `services/`; see pyproject.toml).

Packages: `poe_services.registry`, `poe_services.extractor`, `poe_services.composer`; beside them the
host (`host.py`), the metrics (`metrics.py`) and the server half of the error mapping (`errors.py`).
"""
