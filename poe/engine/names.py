"""Naming rules shared by hierarchies, the registry and the extractor: one pattern per kind of name."""

from __future__ import annotations

import re

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # pools, data sets, primitive tasks
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
ALIAS = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
FORMAT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
