"""Fetch one source file's bytes from where a layout keeps it.

A location is a plain tuple so that millions of them pickle cheaply to worker processes:
- ("file", path)
- ("range", path, offset, size): bytes inside an uncompressed tar, possibly nested (ImageNet archives)
- ("zip", path, member): a member of a zip file (Tiny ImageNet's zip, ImageNet-Sketch's)
- ("gz", path, offset, size): bytes at an offset of a gzip-compressed tar's uncompressed stream
  (ImageNet-V2's .tar.gz); read forward only, so a reader asks for them in offset order
  (`read_in_order`), else each backward step decompresses the archive again from its start
Open files are cached per process: a worker reads thousands of members of the same archive.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from functools import lru_cache

from imagenet_ddp.errors import UserError


@lru_cache(maxsize=8)
def _fd(path: str) -> int:
    return os.open(path, os.O_RDONLY)


@lru_cache(maxsize=4)
def _zip(path: str, pid: int) -> zipfile.ZipFile:
    # Keyed by pid: a ZipFile inherited through fork shares its file offset with the parent's.
    return zipfile.ZipFile(path)


@lru_cache(maxsize=2)
def _gzip(path: str, pid: int) -> gzip.GzipFile:
    return gzip.GzipFile(path, "rb")


def read_in_order(locs: list[tuple]) -> dict[tuple, bytes | OSError]:
    """The bytes of the "gz" locations among `locs`, read in offset order (one forward pass per
    archive); a member that cannot be read maps to its error. Other locations are left out."""
    out: dict[tuple, bytes | OSError] = {}
    for loc in sorted((loc for loc in locs if loc[0] == "gz"), key=lambda loc: (loc[1], loc[2])):
        try:
            out[loc] = read_bytes(loc)
        except (OSError, EOFError) as e:
            out[loc] = e if isinstance(e, OSError) else OSError(f"{loc[1]}: {e}")
    return out


def read_bytes(loc: tuple) -> bytes:
    kind = loc[0]
    if kind == "file":
        with open(loc[1], "rb") as f:
            return f.read()
    if kind == "range":
        _, path, offset, size = loc
        data = os.pread(_fd(path), size, offset)
        if len(data) != size:
            raise OSError(f"{path}: archive ends inside a member at offset {offset}")
        return data
    if kind == "gz":
        _, path, offset, size = loc
        f = _gzip(path, os.getpid())
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: archive ends inside a member at offset {offset}")
        return data
    if kind == "zip":
        return _zip(loc[1], os.getpid()).read(loc[2])
    raise ValueError(f"unknown source location {loc!r}")


class _Window(io.RawIOBase):
    """A read-only view of `length` bytes at `start` of an open file: lets tarfile list a nested tar."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def tar_members(f, start: int, length: int, what: str):
    """(name, absolute data offset, size) of the regular files of the tar at f[start:start+length]."""
    try:
        with tarfile.open(fileobj=_Window(f, start, length), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    if m.offset_data + m.size > length:
                        raise UserError(f"{what} is truncated: member {m.name} ends past the file's end")
                    yield m.name, start + m.offset_data, m.size
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"{what} is not a readable tar archive ({e})") from None
