"""docs/config.md is the schema's reference: complete, described, and regenerated with it."""

import subprocess
import sys
from pathlib import Path

from imagenet_ddp import config, config_docs

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "config.md"


def test_every_key_has_a_description():
    assert config_docs.undescribed() == [], "add a comment beside each of these fields in the schema"


def test_the_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/config.md is out of date: python -m imagenet_ddp.config_docs > docs/config.md"
    )


def test_every_key_a_user_can_set_is_on_the_page():
    text = PAGE.read_text(encoding="utf-8")
    for key in config.flat(config.load_config()):
        assert f"| `{key}` |" in text, key


def test_check_command_tells_a_stale_page(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text(PAGE.read_text(encoding="utf-8").replace("passes over the train split", "epochs"))
    cmd = [sys.executable, "-m", "imagenet_ddp.config_docs", "--check"]
    assert subprocess.run([*cmd, str(PAGE)], cwd=ROOT).returncode == 0
    done = subprocess.run([*cmd, str(stale)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "out of date" in done.stderr
