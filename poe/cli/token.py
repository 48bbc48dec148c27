"""`poe token create|list|revoke`: the bearer tokens in a token file (POE_TOKENS_FILE).

The servers that read the same file (`poe up` on this machine; in Kubernetes the file is a Secret)
accept a new token, and refuse a revoked one, within a couple of seconds, without a restart.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from pathlib import Path

from poe.cli.output import emit, table
from poe.engine.config import ROLES, settings
from poe.engine.errors import InvalidArgument

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _duration(text: str) -> timedelta:
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 12h, 30d or 1w, got {text!r}")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def _file(args: argparse.Namespace) -> Path:
    path = Path(args.tokens_file).expanduser() if args.tokens_file else settings().tokens_file
    if path is None:
        raise InvalidArgument("no token file: set POE_TOKENS_FILE or pass --tokens-file")
    return path


def _row(entry) -> dict:
    d = entry.to_dict()
    d.pop("sha256")
    d["state"] = entry.state()
    return d


def cmd_create(args: argparse.Namespace) -> int:
    from poe_services import tokens

    path = _file(args)
    entry, token = tokens.create(path, args.role, args.name or "", args.expires, args.id)
    if args.json:
        return emit({**_row(entry), "token": token}, True, str)
    print(token)
    expiry = f", expires {entry.to_dict()['expires']}" if entry.expires else ""
    print(f"token {entry.id} ({entry.role}{expiry}) added to {path}; it is shown only now", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from poe_services import tokens

    rows = [_row(e) for e in tokens.list_tokens(_file(args))]
    header = f"{'ID':<14} {'ROLE':<10} {'STATE':<8} {'EXPIRES':<21} NAME"
    return table(rows, args.json, empty="no tokens", header=header,
                 line=lambda r: f"{r['id']:<14} {r['role']:<10} {r['state']:<8} {r['expires'] or '-':<21} {r['name']}")


def cmd_revoke(args: argparse.Namespace) -> int:
    from poe_services import tokens

    entry = tokens.revoke(_file(args), args.id)
    return emit(_row(entry), args.json, lambda: f"token {entry.id} revoked")


def add_parsers(sub) -> None:
    t = sub.add_parser("token", help="create, list and revoke bearer tokens (roles: " + ", ".join(ROLES) + ")",
                       description=__doc__.split("\n\n")[0])
    tsub = t.add_subparsers(dest="token_command", required=True, metavar="{create,list,revoke}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokens-file", help="the token file (default POE_TOKENS_FILE, else POE_HOME/tokens.json)")
        p.add_argument("--json", action="store_true", help="print JSON")

    c = tsub.add_parser("create", help="add a token and print it (once: only its sha256 is kept)")
    c.add_argument("--role", required=True, choices=ROLES,
                   help="reader: compose and read; publisher: also register, publish, aliases and its own "
                        "extractions; admin: everything, deletes included; service: composer and extractor")
    c.add_argument("--name", help="what the token is for (shown by list; default its id)")
    c.add_argument("--id", help="the token's id (default random; a-z, 0-9, -)")
    c.add_argument("--expires", type=_duration, help="lifetime, e.g. 12h, 30d, 1w (default: until revoked)")
    common(c)
    c.set_defaults(func=cmd_create)

    ls = tsub.add_parser("list", help="the tokens in the file (never the tokens themselves)")
    common(ls)
    ls.set_defaults(func=cmd_list)

    r = tsub.add_parser("revoke", help="revoke a token by id (servers refuse it within seconds)")
    r.add_argument("id")
    common(r)
    r.set_defaults(func=cmd_revoke)
