"""predict.py --serve: the JSON endpoint over real HTTP, and the page in a real headless chromium.

.ci/browser.sh installs chromium and chromedriver (selenium is in the dev extra); without them the
browser tests skip, except under CI=true where they fail.
Everything runs on 127.0.0.1: chromium starts with its background services off and a host resolver
that resolves nothing else.

python -m pytest tests/test_serve.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenet_ddp.errors import UserError
from imagenet_ddp.inference import Classifier, classify_files
from imagenet_ddp.labels import imagenet_names
from imagenet_ddp.serve import make_server
from imagenet_ddp.synth import jpeg_bytes, synth_image
from tests.test_predict import WNIDS, make_checkpoint

LIMIT = 300_000  # bytes: small, so that an oversize upload is quick to make


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> Classifier:
    return Classifier.from_checkpoint(
        make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt"), device="cpu"
    )


@contextlib.contextmanager
def serving(server):
    """`server` answering in a thread, at the yielded base URL, until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def url(clf):
    with serving(make_server(clf, port=0, quiet=True, lang="es", max_upload_bytes=LIMIT)) as base:
        yield base


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = {
        "cat.jpg": jpeg_bytes(synth_image(np.random.default_rng(0), 200, 150)),
        "big.png": (io.BytesIO(), Image.fromarray(noise)),
        "notes.txt": b"this is not an image\n",
    }
    buf, img = data["big.png"]
    img.save(buf, "PNG")
    data["big.png"] = buf.getvalue()
    assert len(data["big.png"]) > LIMIT
    for name, content in data.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in data}


def post(url: str, body: bytes, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_endpoint_answers_the_top_5_in_the_asked_language_like_the_cli(clf, url, files):
    status, body = post(f"{url}/api/predict?lang=fr", files["cat.jpg"].read_bytes())
    assert status == 200 and body["lang"] == "fr" and len(body["top"]) == 5
    [(_, expected)] = classify_files(clf, [(str(files["cat.jpg"]), None)], lang="fr")
    assert [t["wnid"] for t in body["top"]] == [c.wnid for c, _ in expected.top]
    assert [t["probability"] for t in body["top"]] == pytest.approx([p for _, p in expected.top], rel=1e-5)
    french = imagenet_names("fr")
    assert all(t["name"] == french[t["wnid"]] for t in body["top"])
    status, body = post(f"{url}/api/predict?topk=2", files["cat.jpg"].read_bytes())
    assert status == 200 and body["lang"] == "es" and len(body["top"]) == 2  # the server's --lang


def test_uploads_that_are_too_large_or_not_images_or_badly_asked_are_refused_clearly(url, files):
    status, body = post(f"{url}/api/predict", files["big.png"].read_bytes())
    assert status == 413 and body["error"] == "the upload is 0.5 MB: larger than the limit of 0.3 MB"
    status, body = post(f"{url}/api/predict", files["notes.txt"].read_bytes())
    assert status == 415 and body["error"] == "not an image (unrecognized format)"
    status, body = post(f"{url}/api/predict", b"")
    assert status == 415 and body["error"] == "empty file"
    status, body = post(f"{url}/api/predict?lang=xx", files["cat.jpg"].read_bytes())
    assert status == 400 and "available: de, en, es, fr, it, pt" in body["error"]
    status, body = post(f"{url}/api/predict?topk=11", files["cat.jpg"].read_bytes())
    assert status == 400 and body["error"] == "topk must be a whole number from 1 to 10"


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send `head` (request line and headers, as typed) and `body` over a plain socket: urllib
    refuses to send a malformed Content-Length."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        response = conn.makefile("rb").read()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("length", ["-1", "abc", "+5", "1_000", " -0"])
def test_a_negative_or_malformed_content_length_is_refused_at_once(url, length):
    """int() accepts "-1", "+5" and "1_000": a length of -1 used to pass the limit check and then
    read until the client closed."""
    head = f"POST /api/predict HTTP/1.1\nHost: 127.0.0.1\nContent-Length: {length}\nConnection: close\n"
    status, body = raw_request(url, head)
    assert (
        status == 400 and body["error"] == f"Content-Length must be a number of bytes, not {length.strip()!r}"
    )
    head = "POST /api/predict HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\nConnection: close\n"
    assert raw_request(url, head)[0] == 411


def test_an_image_with_more_pixels_than_the_server_takes_is_refused_before_decoding(clf):
    server = make_server(clf, port=0, quiet=True, max_pixels=100 * 100)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        big = jpeg_bytes(synth_image(np.random.default_rng(0), 120, 100))
        status, body = post(f"http://{host}:{port}/api/predict", big)
        assert (
            status == 415
            and body["error"] == "too many pixels: 120 x 100 = 0 Mpx, more than the limit of 0 Mpx"
        )
        small = jpeg_bytes(synth_image(np.random.default_rng(0), 100, 100))
        assert post(f"http://{host}:{port}/api/predict", small)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def one_slot(clf, monkeypatch):
    """A server that classifies one image at a time and waits 0.1 s for a free slot."""
    import imagenet_ddp.serve as serve

    monkeypatch.setattr(serve, "BUSY_WAIT_S", 0.1)
    monkeypatch.setattr(serve, "BODY_DEADLINE_S", 1)
    with serving(make_server(clf, port=0, quiet=True, max_concurrent=1, max_upload_bytes=50_000_000)) as base:
        yield base


def test_predictions_beyond_max_concurrent_wait_then_get_503(one_slot, files):
    """One slot: while a large image decodes, another upload is told the server is busy."""
    noise = np.random.default_rng(2).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    large = jpeg_bytes(Image.fromarray(noise))  # 12 Mpx of noise: a decode and resize of ~100 ms here
    small = files["cat.jpg"].read_bytes()
    for _ in range(5):  # the slow one may finish before a poll lands: try again
        slow = []
        thread = threading.Thread(target=lambda out=slow: out.append(post(f"{one_slot}/api/predict", large)))
        thread.start()
        answers = []
        while thread.is_alive() and not any(a[0] == 503 for a in answers):
            answers.append(post(f"{one_slot}/api/predict", small))
        thread.join()
        assert slow[0][0] == 200
        if any(a[0] == 503 for a in answers):
            break
    assert (503, {"error": "busy: all 1 prediction slots are taken; try again"}) in answers
    assert post(f"{one_slot}/api/predict", small)[0] == 200  # the slot is free again


def test_an_upload_that_trickles_in_gets_408_and_holds_no_slot(one_slot, files):
    host, port = one_slot.removeprefix("http://").split(":")
    image = files["cat.jpg"].read_bytes()
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        head = f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(image)}\r\n\r\n"
        slow.sendall(head.encode() + image[:10])  # and nothing more: the server's deadline is 1 s
        assert post(f"{one_slot}/api/predict", image)[0] == 200  # meanwhile the one slot is free
        response = slow.makefile("rb").read()
    assert response.split()[1] == b"408" and b"the upload did not arrive within 1 s" in response


def test_it_listens_on_localhost_only_and_answers_only_requests_addressed_to_it(clf, url):
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(f"{url}/api/info", headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403
    with urllib.request.urlopen(f"{url}/api/info", timeout=30) as response:
        info = json.loads(response.read())
    assert (
        info["num_classes"] == len(WNIDS) and info["max_upload_bytes"] == LIMIT and "es" in info["languages"]
    )
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another --port"):
        make_server(clf, port=port)


# ---------------------------------------------------------------- in a real browser


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def pick(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))


def status_after(driver, text_part: str) -> str:
    from selenium.webdriver.common.by import By

    return wait_for(driver, lambda d: text_part in (t := d.find_element(By.ID, "status").text) and t)


def shown_labels(driver) -> list[tuple[str, str]]:
    """(wnid, name) of each listed class, read in one step (the list is rebuilt on every answer)."""
    script = """return [...document.querySelectorAll('#result:not([hidden]) #top li')]
        .map(li => [li.dataset.wnid, li.querySelector('.name').textContent]);"""
    return [tuple(pair) for pair in driver.execute_script(script)]


def test_a_person_picks_an_image_and_sees_its_top_5_in_their_language(browser, url, files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{url}/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))
    assert Select(browser.find_element(By.ID, "lang")).first_selected_option.get_attribute("value") == "es"
    pick(browser, files["cat.jpg"])
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    _, expected = post(f"{url}/api/predict?lang=es", files["cat.jpg"].read_bytes())
    assert shown_labels(browser) == [(t["wnid"], t["name"]) for t in expected["top"]]
    first = browser.find_element(By.CSS_SELECTOR, "#top li .probability").text
    assert first == f"{100 * expected['top'][0]['probability']:.1f}%"
    # Another language: the same image is asked again and the names change.
    Select(browser.find_element(By.ID, "lang")).select_by_value("de")
    german = imagenet_names("de")
    wait_for(browser, lambda d: shown_labels(d) == [(t["wnid"], german[t["wnid"]]) for t in expected["top"]])


def test_a_dropped_image_is_classified_too(browser, url, files):
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))
    data = list(files["cat.jpg"].read_bytes())
    # What the browser does when a file is dropped: a drop event carrying the file.
    browser.execute_script(
        """const file = new File([new Uint8Array(arguments[0])], "dropped.jpg", {type: "image/jpeg"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer}));""",
        data,
    )
    wait_for(browser, lambda d: len(shown_labels(d)) == 5)
    assert browser.find_element(By.ID, "status").text == "dropped.jpg"


def test_an_oversize_file_and_a_non_image_get_a_clear_message(browser, url, files):
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))
    pick(browser, files["big.png"])
    message = status_after(browser, "limit")
    assert message == "big.png is 0.5 MB: larger than the limit of 0.3 MB."
    assert not browser.find_element(By.ID, "result").is_displayed()
    pick(browser, files["notes.txt"])
    assert status_after(browser, "not an image") == "notes.txt: not an image (unrecognized format)"
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


@pytest.fixture(scope="module")
def onnx_url(tmp_path_factory):
    """The page serving an exported model on onnxruntime (predict.py --model model.onnx --serve)."""
    import predict
    from imagenet_ddp.export import OnnxClassifier

    folder = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(folder / "best.pt")
    assert predict.main(["--checkpoint", str(ckpt), "--export", str(folder / "model.onnx")]) == 0
    with serving(make_server(OnnxClassifier(folder / "model.onnx"), port=0, quiet=True, lang="es")) as base:
        yield base


def test_the_page_serves_an_exported_model_on_onnxruntime(browser, onnx_url, files):
    from selenium.webdriver.common.by import By

    with urllib.request.urlopen(f"{onnx_url}/api/info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["model"] == "resnet18" and info["num_classes"] == len(WNIDS)
    browser.get(f"{onnx_url}/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))
    pick(browser, files["cat.jpg"])
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    _, expected = post(f"{onnx_url}/api/predict?lang=es", files["cat.jpg"].read_bytes())
    spanish = imagenet_names("es")
    assert shown_labels(browser) == [(t["wnid"], spanish[t["wnid"]]) for t in expected["top"]]
    status, body = post(f"{onnx_url}/api/predict", files["notes.txt"].read_bytes())
    assert status == 415 and body["error"] == "not an image (unrecognized format)"
