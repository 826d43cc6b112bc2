"""Optional parts of the suite: a test that needs one skips without it, except under CI=true, where
the part is expected to be installed and its absence fails the test.

    needs("nvidia.dali")               a module, imported: returns it
    needs("wds2idx")                   an executable (PATH, or next to this Python): returns its path
    needs("tmpfs")                     a capability: mounting a tmpfs (root)
    @pytest.mark.needs("onnxscript")   the same as a mark, e.g. on a parameter:
    pytest.param("dali", marks=pytest.mark.needs("nvidia.dali"))

The mark is applied by tests/conftest.py before each test runs.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

INSTALL = {  # what to run when a part is missing
    "nvidia.dali": "pip install -e .[dali]",
    "onnxscript": "pip install -e .[export]",
    "wds2idx": "pip install webdataset",
    "chromium": ".ci/browser.sh",
    "tmpfs": "run the tests as root (mount -t tmpfs)",
}


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(reason: str) -> None:
    """Skip the running test for `reason`; under CI=true fail it instead."""
    if under_ci():
        pytest.fail(f"CI is set, and this test needs what is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def needs(what: str):
    """The part `what` (module, executable or capability), or a skip (a failure under CI=true)."""
    found, reason = _probe(what)
    if reason:
        hint = INSTALL.get(what)
        unavailable(f"{what}: {reason}" + (f" ({hint})" if hint else ""))
    return found


@functools.cache
def _probe(what: str) -> tuple[object, str | None]:
    if what in CAPABILITIES:
        return CAPABILITIES[what]()
    if what in EXECUTABLES:
        return _executable(what)
    try:
        return importlib.import_module(what), None
    except ImportError as e:
        return None, f"cannot import it: {e}"


def _executable(name: str) -> tuple[str | None, str | None]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    return found, None if found else "not on PATH nor next to this Python"


def _chromium() -> tuple[tuple | None, str | None]:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    return (found, None) if all(found) else (None, "chromium and chromedriver are not both on PATH")


def _tmpfs() -> tuple[bool, str | None]:
    with tempfile.TemporaryDirectory(prefix="needs-tmpfs-") as where:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where], capture_output=True
        )
        if mounted.returncode != 0:
            return False, f"cannot mount one here: {mounted.stderr.decode().strip()}"
        subprocess.run(["umount", where], check=True)
    return True, None


EXECUTABLES = {"wds2idx", "prlimit", "setpriv"}
CAPABILITIES = {"chromium": _chromium, "tmpfs": _tmpfs}
