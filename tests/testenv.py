"""Environment shared by every test server and client (imported by name: tests/ is on sys.path).

The root conftest makes one token file for the whole run, with an admin and a service token, and
puts POE_TOKENS_FILE, POE_TOKEN (admin) and POE_SERVICE_TOKEN in os.environ: clients send the admin
token, and every server built from `auth_env()` (or from os.environ, as subprocesses are) accepts it.
Tests of authentication itself build their own files and tokens.
"""

from __future__ import annotations

import os

AUTH_KEYS = ("POE_TOKENS_FILE", "POE_SERVICE_TOKEN")


def auth_env() -> dict[str, str]:
    """The POE_* variables a test server needs to accept the run's tokens."""
    return {k: os.environ[k] for k in AUTH_KEYS if k in os.environ}
