"""Naming rules shared by hierarchies, the registry and the extractor: one pattern per kind of name.

The patterns are anchored with \\A and \\Z (not ^ and $, which would accept a trailing newline), so
`match` and `fullmatch` agree; the checks in `poe.engine.limits` use them.
"""

from __future__ import annotations

import re

NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")  # pools, data sets, primitive tasks
VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
ALIAS = re.compile(r"\A[a-z][a-z0-9._-]{0,62}\Z")
FORMAT = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,31}\Z")
JOB_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
