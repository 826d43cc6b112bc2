"""The runtime class-name tables stand alone: importing them loads none of the builder's modules,
and `python -m imagenet_ddp.labels` (the builder's command line) still answers."""

import subprocess
import sys


def test_the_tables_do_not_import_their_builder():
    code = (
        "import sys, imagenet_ddp.labels as labels; labels.imagenet_names('es');"
        "print(sorted(m for m in sys.modules if m.startswith('imagenet_ddp.labels_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_command_line_answers():
    cmd = [sys.executable, "-m", "imagenet_ddp.labels", "coverage"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "en torchvision 1000" in out.splitlines()
