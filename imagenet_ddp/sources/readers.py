"""Fetch one source file's bytes from where a layout keeps it.

A location is a plain tuple so that millions of them pickle cheaply to worker processes:
- ("file", path)
- ("range", path, offset, size): bytes inside an uncompressed tar, possibly nested (ImageNet archives)
- ("zip", path, member): a member of a zip file (Tiny ImageNet's zip)
Open files are cached per process: a worker reads thousands of members of the same archive.
"""

from __future__ import annotations

import os
import zipfile
from functools import lru_cache


@lru_cache(maxsize=8)
def _fd(path: str) -> int:
    return os.open(path, os.O_RDONLY)


@lru_cache(maxsize=4)
def _zip(path: str, pid: int) -> zipfile.ZipFile:
    # Keyed by pid: a ZipFile inherited through fork shares its file offset with the parent's.
    return zipfile.ZipFile(path)


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
    if kind == "zip":
        return _zip(loc[1], os.getpid()).read(loc[2])
    raise ValueError(f"unknown source location {loc!r}")
