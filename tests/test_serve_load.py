"""The web page's server under load: 64 concurrent uploads on loopback each get an HTTP answer (200, or
503 busy after the documented wait), none a reset connection; with the standard library's listen
backlog of 5 (the negative control) some are reset.

python -m pytest tests/test_serve_load.py -q
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from imagenet_ddp.bench.serve import load
from imagenet_ddp.inference import Classifier
from imagenet_ddp.serve import make_server
from imagenet_ddp.synth import jpeg_bytes, synth_image
from tests.test_predict import make_checkpoint


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
    return Classifier.from_checkpoint(path, device="cpu", precision="fp32")


def hammer(clf, clients: int, **limits) -> dict:
    server = make_server(clf, "127.0.0.1", 0, quiet=True, max_concurrent=4, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = jpeg_bytes(synth_image(np.random.default_rng(0), 500, 375), 90)
        return load(server.server_address[1], body, clients, requests=1, timeout=120)
    finally:
        server.shutdown()
        server.server_close()


def test_64_concurrent_uploads_all_get_an_http_answer(clf):
    result = hammer(clf, 64)
    assert set(result["outcomes"]) <= {"200", "503"}, result["outcomes"]
    assert sum(result["outcomes"].values()) == 64 and result["outcomes"].get("200", 0) >= 1


def test_negative_control_the_standard_backlog_resets_some_of_them(clf):
    result = hammer(clf, 64, backlog=5, max_connections=1 << 30)
    failed = {k: n for k, n in result["outcomes"].items() if k not in ("200", "503")}
    assert failed, f"the standard library's backlog of 5 answered all 64: {result['outcomes']}"
