"""Files the extractor opens because a request (or a stored job spec) names them.

A client may name files on the extractor: an oracle file, a data set, a hierarchy file. Each is
opened only when it passes these rules (docs/EXTRACTOR.md, "What the extractor loads"):

- The path, relative paths taken from the allowed directory, is resolved with every symlink
  followed and must end inside an allowed directory: oracle files inside
  POE_EXTRACTOR_ORACLE_DIR (none when unset), data sets and hierarchy files inside POE_DATA_DIR or
  POE_EXTRACTOR_ORACLE_DIR. A path outside is refused without saying whether it exists there.
- A file must be a regular file (never a FIFO, device, socket or directory) of at most a given
  size. It is opened without following a last symlink and without blocking (a FIFO cannot hold
  the request), checked on that descriptor, and read from it with a bounded read.

Every refusal is InvalidArgument naming the request field: the request asks for something this
extractor does not allow, whoever sends it (roles decide who may call, not what may be loaded).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from poe.engine.errors import field_error
from poe.engine.limits import quote

MAX_TORCHSCRIPT_BYTES = 1 << 30  # a TorchScript oracle in the oracle directory
MAX_SIDECAR_BYTES = 1 << 20  # JSON beside an oracle (its config) and pool.json
MAX_HIERARCHY_BYTES = 4 << 20  # a hierarchy file (YAML or JSON)
MAX_DATASET_FILE_BYTES = 16 << 30  # an .npz data set (it is loaded into memory whole)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class InputFiles:
    """The extractor's allowed directories, from its settings."""

    def __init__(self, oracle_dir: Path | None, data_dir: Path | None):
        self.oracle_dirs = [Path(oracle_dir)] if oracle_dir is not None else []
        self.data_dirs = [Path(d) for d in (data_dir, oracle_dir) if d is not None]

    # -- paths -------------------------------------------------------------------------------------

    @staticmethod
    def _names(roots: Sequence[Path]) -> str:
        return " or ".join(str(r) for r in roots)

    def resolve(self, requested: str, roots: Sequence[Path], field: str, what: str) -> Path:
        """The real path of `requested` (symlinks followed) when it lies inside one of `roots`."""
        if not roots:
            raise field_error(field, f"{what} named by path are not accepted by this extractor (it has no "
                                     "POE_EXTRACTOR_ORACLE_DIR); register the oracle in the registry and send its id")
        if not isinstance(requested, str) or not requested or "\x00" in requested:
            raise field_error(field, f"expected a path, got {quote(requested)}")
        inside = []  # a relative path may name a file in any of the roots: the first where it exists
        for root in roots:
            base = Path(os.path.realpath(root))
            path = Path(requested) if os.path.isabs(requested) else base / requested
            real = Path(os.path.realpath(path))
            if real == base or base in real.parents:
                if os.path.lexists(real):
                    return real
                inside.append(real)
        if inside:
            return inside[0]
        raise field_error(field, f"{quote(requested)} is not inside {self._names(roots)}: the extractor opens "
                                 f"{what} only there")

    def oracle_path(self, requested: str, field: str) -> Path:
        return self.resolve(requested, self.oracle_dirs, field, "oracle files")

    # -- files -------------------------------------------------------------------------------------

    def read(self, requested: str, roots: Sequence[Path], field: str, max_bytes: int, what: str) -> tuple[Path, bytes]:
        """(real path, bytes) of a regular file inside `roots`, at most `max_bytes`."""
        real = self.resolve(requested, roots, field, what)
        return real, read_regular(real, field, max_bytes, roots)

    def read_oracle(self, requested: str, field: str, max_bytes: int) -> tuple[Path, bytes]:
        return self.read(requested, self.oracle_dirs, field, max_bytes, "oracle files")

    def read_data(self, requested: str, field: str, max_bytes: int, what: str) -> tuple[Path, bytes]:
        return self.read(requested, self.data_dirs, field, max_bytes, what)

    def data_path(self, requested: str, field: str) -> Path:
        """A data set: a directory or a regular file (an .npz, at most MAX_DATASET_FILE_BYTES)
        inside the data directories. The files below a data set directory are the operator's."""
        real = self.resolve(requested, self.data_dirs, field, "data sets")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise field_error(field, f"{quote(requested)}: no such data set on the extractor") from None
        except OSError as e:
            raise field_error(field, f"{quote(requested)}: cannot read ({e.strerror})") from None
        if stat.S_ISREG(st.st_mode):
            if st.st_size > MAX_DATASET_FILE_BYTES:
                raise field_error(field, f"{quote(requested)}: {st.st_size} bytes; at most {MAX_DATASET_FILE_BYTES}")
        elif not stat.S_ISDIR(st.st_mode):
            raise field_error(field, f"{quote(requested)} is {kind_of(st.st_mode)}, expected a data set "
                                     "directory or file")
        return real


def read_regular(path: Path, field: str, max_bytes: int, roots: Sequence[Path] = ()) -> bytes:
    """The bytes of the regular file at `path` (already resolved), read from one descriptor that is
    checked first: not a FIFO, device or directory, at most `max_bytes`, and (when `roots` are given)
    still inside them once opened, in case a directory on the way was swapped for a symlink."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise field_error(field, f"{path.name}: no such file on the extractor") from None
    except OSError as e:
        raise field_error(field, f"{path.name}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise field_error(field, f"{path.name} is {kind_of(st.st_mode)}, expected a regular file")
        if st.st_size > max_bytes:
            raise field_error(field, f"{path.name}: {st.st_size} bytes; at most {max_bytes}")
        if roots:
            with contextlib.suppress(OSError):  # no /proc: the resolved path was checked already
                opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
                if not any(opened == Path(os.path.realpath(r)) or Path(os.path.realpath(r)) in opened.parents
                           for r in roots):
                    raise field_error(field, f"{path.name}: moved out of the allowed directory while opened")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew since fstat
                raise field_error(field, f"{path.name}: more than {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise field_error(field, f"{path.name}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
