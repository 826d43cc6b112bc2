"""predict.py --serve: the JSON endpoint over real HTTP, and the page in a real headless chromium, in
each of its languages.

.ci/browser.sh installs chromium and chromedriver (selenium is in the dev extra); without them the
browser tests skip, except under CI=true where they fail.
Everything runs on 127.0.0.1: chromium starts with its background services off and a host resolver
that resolves nothing else.

python -m pytest tests/test_serve.py -q
SAVE_SCREENSHOTS=docs python -m pytest tests/test_serve.py -q -k spanish     # also writes docs/page-es.png
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
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
from imagenet_ddp.labels import available_languages, imagenet_names
from imagenet_ddp.serve import LANGUAGE_NAMES, WEB_DIR, make_server
from imagenet_ddp.synth import jpeg_bytes, synth_image
from tests.test_predict import WNIDS, make_checkpoint

LIMIT = 300_000  # bytes: small, so that an oversize upload is quick to make
MAX_PIXELS = 100_000  # 0.1 Mpx: above cat.jpg's 200 x 150, below wide.png's 500 x 250


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
    server = make_server(clf, port=0, quiet=True, lang="es", max_upload_bytes=LIMIT, max_pixels=MAX_PIXELS)
    with serving(server) as base:
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
    buf = io.BytesIO()
    Image.new("RGB", (500, 250), "teal").save(buf, "PNG")
    data["wide.png"] = buf.getvalue()  # a few hundred bytes, 0.125 Mpx
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
    """In English, whatever the language asked for (the page words the code in its own language)."""
    status, body = post(f"{url}/api/predict?lang=es", files["big.png"].read_bytes())
    assert status == 413 and body == {
        "error": "the upload is 0.5 MB: larger than the limit of 0.3 MB",
        "code": "too_large",
    }
    status, body = post(f"{url}/api/predict?lang=es", files["notes.txt"].read_bytes())
    assert status == 415 and body == {"error": "not an image (unrecognized format)", "code": "not_an_image"}
    status, body = post(f"{url}/api/predict", b"")
    assert status == 415 and body == {"error": "empty file", "code": "empty"}
    status, body = post(f"{url}/api/predict", files["wide.png"].read_bytes())
    assert status == 415 and body["code"] == "too_many_pixels"
    status, body = post(f"{url}/api/predict", files["cat.jpg"].read_bytes()[:2000])
    assert status == 415 and body["code"] == "damaged" and body["error"].startswith("cannot decode this JPEG")
    status, body = post(f"{url}/api/predict?lang=xx", files["cat.jpg"].read_bytes())
    assert (
        status == 400 and "available: de, en, es, fr, it, pt" in body["error"] and body["code"] == "bad_lang"
    )
    status, body = post(f"{url}/api/predict?topk=11", files["cat.jpg"].read_bytes())
    assert status == 400 and body == {"error": "topk must be a whole number from 1 to 10", "code": "bad_topk"}


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
    assert (503, {"error": "busy: all 1 prediction slots are taken; try again", "code": "busy"}) in answers
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


# ---------------------------------------------------------------- the page's words

SAVED = "imagenet-ddp.lang"  # app.js's localStorage key
# The error codes the server can give the page's uploads (serve.py), and those the page finds itself.
PAGE_ERRORS = {"too_large", "timeout", "busy", "empty", "not_an_image", "too_many_pixels", "damaged"}
PAGE_ERRORS |= {"network", "no_server", "server_error"}


def page_strings() -> dict[str, dict[str, str]]:
    """web/i18n.js's table, {language: {key: text}}: strict JSON after `const STRINGS = `."""
    source = (WEB_DIR / "i18n.js").read_text()
    return json.loads(source.split("\nconst STRINGS = ", 1)[1].rstrip().removesuffix(";"))


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", text))


def test_the_page_has_its_words_in_every_language_of_the_class_names():
    strings = page_strings()
    assert set(strings) == set(available_languages()) == set(LANGUAGE_NAMES)
    english = strings["en"]
    for lang, table in strings.items():
        assert list(table) == list(english), lang
        for key, text in table.items():
            assert text.strip() and placeholders(text) == placeholders(english[key]), (lang, key)
        if lang != "en":  # "{model}, {count} classes" is French and Portuguese too
            assert {key for key in english if table[key] == english[key]} <= {"model"}, lang
    # Every word the page asks for is there, and every error the page can show is worded.
    html, js = (WEB_DIR / "index.html").read_text(), (WEB_DIR / "app.js").read_text()
    asked = set(re.findall(r'data-i18n="(\w+)"', html)) | set(re.findall(r'\bt\("(\w+)"', js))
    assert {"title", "drop", "choose", "language", "looking"} <= asked <= english.keys()
    assert english.keys() >= PAGE_ERRORS and all(f'"{code}"' in js for code in PAGE_ERRORS)


# ---------------------------------------------------------------- in a real browser


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def open_page(driver, base: str, saved: str | None = None) -> None:
    """The page as on a first visit (nothing remembered), or with `saved` chosen on an earlier one."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/")
    script = "localStorage.clear(); if (arguments[1]) localStorage.setItem(arguments[0], arguments[1]);"
    driver.execute_script(script, SAVED, saved)
    driver.refresh()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))


def choose_language(driver, code: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "lang")).select_by_value(code)


def page_language(driver) -> tuple[str, str]:
    """(<html lang>, the picker's value)."""
    return tuple(
        driver.execute_script("return [document.documentElement.lang, document.getElementById('lang').value]")
    )


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def pick(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))


def error_after(driver, text_part: str) -> str:
    """The error the status line shows once it is one and mentions `text_part` (not "Looking at...")."""
    script = "const s = document.getElementById('status'); return s.className === 'error' ? s.innerText : '';"
    text = wait_for(driver, lambda d: text_part in (t := d.execute_script(script)) and t)
    return text.replace("\u00a0", " ")  # as Selenium's .text reads it


def shown_labels(driver) -> list[tuple[str, str]]:
    """(wnid, name) of each listed class, read in one step (the list is rebuilt on every answer)."""
    script = """return [...document.querySelectorAll('#result:not([hidden]) #top li')]
        .map(li => [li.dataset.wnid, li.querySelector('.name').textContent]);"""
    return [tuple(pair) for pair in driver.execute_script(script)]


def percent(probability: float, lang: str) -> str:
    """How the page writes a probability: Intl.NumberFormat's percent (nbsp read as a space)."""
    digits = f"{100 * probability:.1f}"
    return {"en": f"{digits}%", "es": f"{digits.replace('.', ',')} %"}[lang]


def english_words_left(driver, strings) -> list[str]:
    """The pieces of the page's English strings (between placeholders) shown on the page now."""
    from selenium.webdriver.common.by import By

    shown = driver.title + "\n" + driver.find_element(By.TAG_NAME, "body").text
    pieces = {p.strip(" .,:;()…?") for text in strings["en"].values() for p in re.split(r"\{\w+\}", text)}
    return sorted(p for p in pieces if len(p) > 3 and p in shown)


def test_the_page_in_spanish_every_word_class_name_and_error_and_the_choice_kept(
    browser, url, files, tmp_path
):
    from selenium.webdriver.common.by import By

    strings = page_strings()
    open_page(browser, url, saved="en")
    assert text_of(browser, "h1") == "What is in this image?" and page_language(browser) == ("en", "en")
    choose_language(browser, "es")
    assert page_language(browser) == ("es", "es") and browser.title == "¿Qué hay en esta imagen?"
    assert text_of(browser, "h1") == "¿Qué hay en esta imagen?"
    assert text_of(browser, "#model") == f"resnet18, {len(WNIDS)} clases"
    assert text_of(browser, "label.lang span") == "Idioma"
    assert text_of(browser, "#drop") == "Suelta una imagen aquí o\nelige una\nHasta 0,3 MB."
    pick(browser, files["cat.jpg"])
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    _, expected = post(f"{url}/api/predict?lang=es", files["cat.jpg"].read_bytes())
    spanish, english = imagenet_names("es"), imagenet_names("en")
    assert shown_labels(browser) == [(t["wnid"], spanish[t["wnid"]]) for t in expected["top"]]
    assert sum(spanish[t["wnid"]] != english[t["wnid"]] for t in expected["top"]) >= 4
    assert text_of(browser, "#top-title") == "Las 5 clases más probables"
    assert text_of(browser, "#top li .probability") == percent(expected["top"][0]["probability"], "es")
    assert text_of(browser, "#status") == "cat.jpg"
    assert english_words_left(browser, strings) == []
    screenshot(browser, tmp_path / "page-es.png")

    browser.refresh()  # the choice is kept: a later visit starts in Spanish
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lang option"))
    assert page_language(browser) == ("es", "es") and text_of(browser, "h1") == "¿Qué hay en esta imagen?"
    assert english_words_left(browser, strings) == []

    pick(browser, files["notes.txt"])
    no_image = "notes.txt no es una imagen o está en un formato que el servidor no puede leer."
    assert error_after(browser, "notes.txt") == no_image
    pick(browser, files["big.png"])
    assert error_after(browser, "big.png") == "big.png ocupa 0,5 MB: supera el límite de 0,3 MB."
    pick(browser, files["wide.png"])
    pixels = "wide.png tiene demasiados píxeles: el límite es de 0,1 megapíxeles."
    assert error_after(browser, "wide.png") == pixels
    assert english_words_left(browser, strings) == []
    choose_language(browser, "en")  # the error shown follows the picker
    assert error_after(browser, "limit") == "wide.png has too many pixels: the limit is 0.1 megapixels."


def screenshot(driver, path: Path) -> None:
    """The page as shown, into `path`; with SAVE_SCREENSHOTS=docs also into docs/, made small."""
    size = driver.get_window_size()
    driver.set_window_size(820, 800)
    try:
        path.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.set_window_size(size["width"], size["height"])
    with Image.open(path) as image:
        assert image.width >= 700 and image.height >= 500
        assert len(image.convert("RGB").getcolors(1 << 20)) > 100  # text, a photo and bars, not a blank page
        if os.environ.get("SAVE_SCREENSHOTS"):
            image.convert("RGB").quantize(256).save(
                Path(os.environ["SAVE_SCREENSHOTS"]) / path.name, optimize=True
            )


def test_the_picker_turns_the_page_into_each_language(browser, url):
    strings = page_strings()
    open_page(browser, url, saved="en")
    for code, words in strings.items():
        choose_language(browser, code)
        assert page_language(browser) == (code, code) and browser.title == words["title"]
        shown = [text_of(browser, css) for css in ("h1", "label.lang span", "#drop p", ".pick span")]
        assert shown == [words[key].replace("\u00a0", " ") for key in ("title", "language", "drop", "choose")]


@contextlib.contextmanager
def browser_languages(driver, accept_language: str):
    """The browser set to prefer `accept_language` (navigator.languages), for the block's page loads."""
    agent = driver.execute_script("return navigator.userAgent")
    driver.execute_cdp_cmd(
        "Emulation.setUserAgentOverride", {"userAgent": agent, "acceptLanguage": accept_language}
    )
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": agent, "acceptLanguage": ""})


def test_a_first_visit_speaks_the_browsers_language_else_the_servers(browser, url):
    with browser_languages(browser, "fr-CA,fr;q=0.9,en;q=0.8"):
        open_page(browser, url)
        assert (
            page_language(browser) == ("fr", "fr") and browser.title == "Qu’y a-t-il sur cette image\u00a0?"
        )
        open_page(browser, url, saved="it")  # a choice made earlier wins
        assert page_language(browser) == ("it", "it")
    with browser_languages(browser, "ja,zh-CN;q=0.9"):  # none the page speaks: the server's --lang es
        open_page(browser, url)
        assert page_language(browser) == ("es", "es")


def test_a_person_picks_an_image_and_sees_its_top_5_in_their_language(browser, url, files):
    open_page(browser, url, saved="es")
    pick(browser, files["cat.jpg"])
    _, expected = post(f"{url}/api/predict?lang=es", files["cat.jpg"].read_bytes())
    spanish = imagenet_names("es")
    wait_for(browser, lambda d: shown_labels(d) == [(t["wnid"], spanish[t["wnid"]]) for t in expected["top"]])
    # Another language: the same image is asked again and the names change.
    choose_language(browser, "de")
    german = imagenet_names("de")
    wait_for(browser, lambda d: shown_labels(d) == [(t["wnid"], german[t["wnid"]]) for t in expected["top"]])
    assert text_of(browser, "#top-title") == "Die 5 wahrscheinlichsten Klassen"


def test_a_dropped_image_is_classified_too(browser, url, files):
    from selenium.webdriver.common.by import By

    open_page(browser, url)
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

    open_page(browser, url, saved="en")
    pick(browser, files["big.png"])
    assert error_after(browser, "big.png") == "big.png is 0.5 MB: larger than the limit of 0.3 MB."
    assert not browser.find_element(By.ID, "result").is_displayed()
    pick(browser, files["notes.txt"])
    no_image = "notes.txt is not an image, or not in a format the server can read."
    assert error_after(browser, "notes.txt") == no_image


def test_a_server_that_stopped_answering_is_told_in_the_chosen_language(browser, clf, files):
    server = make_server(clf, port=0, quiet=True)
    with serving(server) as base:
        open_page(browser, base, saved="es")
    pick(browser, files["cat.jpg"])  # the server is gone: the upload finds no one
    network = "No hay respuesta del servidor. Comprueba la conexión y vuelve a intentarlo."
    assert error_after(browser, "servidor") == network


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
    open_page(browser, onnx_url, saved="es")
    pick(browser, files["cat.jpg"])
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    _, expected = post(f"{onnx_url}/api/predict?lang=es", files["cat.jpg"].read_bytes())
    spanish = imagenet_names("es")
    assert shown_labels(browser) == [(t["wnid"], spanish[t["wnid"]]) for t in expected["top"]]
    status, body = post(f"{onnx_url}/api/predict", files["notes.txt"].read_bytes())
    assert status == 415 and body["error"] == "not an image (unrecognized format)"
