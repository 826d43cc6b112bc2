"""Offline translators that fill the class names Babel-ImageNet and MultiWordNet leave English.

Used by `python -m imagenet_ddp.labels build`; build-time tools only, the shipped tables need none:

    apt-get install apertium apertium-eng-spa apertium-es-pt apertium-fr-es apertium-spa-ita \
        dict-freedict-eng-deu dict-freedict-eng-fra dict-freedict-eng-ita dict-freedict-eng-por \
        dict-freedict-eng-spa

Apertium (rule-based machine translation) has English-Spanish only; Portuguese, French and Italian
are reached from the Spanish name (es-pt, es-fr, spa-ita), which is better than the English one
as it is mostly Babel-ImageNet's. FreeDict (dictd files, read directly) is the only route for
German. Both are taken only when they know every word: Apertium marks unknown words with `*`
and FreeDict is asked for the whole name, never word by word (a German 'Baum Frosch' is worse
than a reviewed name). What they get wrong is fixed in labels_data/reviewed.json.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

APERTIUM_FROM_ENGLISH = {"es": "eng-spa"}
APERTIUM_FROM_SPANISH = {"pt": "es-pt", "fr": "es-fr", "it": "spa-ita"}
FREEDICT_DIR = Path("/usr/share/dictd")
FREEDICT_LANGS = {"es": "spa", "fr": "fra", "de": "deu", "it": "ita", "pt": "por"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def apertium_available(pair: str) -> bool:
    if not shutil.which("apertium"):
        return False
    run = subprocess.run(["apertium", "-l"], capture_output=True, text=True)
    return pair in run.stdout.split()


def apertium(texts: list[str], pair: str) -> dict[str, str]:
    """text -> translation, for the texts Apertium translates with no unknown word.

    One process for all texts, one per line, each ended by a full stop: without it Apertium
    reorders words across lines. `-u` is not used so that unknown words keep their `*` (and
    generation errors their `#`), which is how a partial translation is recognised.
    """
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if not texts:
        return {}
    run = subprocess.run(
        ["apertium", pair],
        input="".join(f"{t}.\n" for t in texts),
        capture_output=True,
        text=True,
        check=True,
    )
    out = [line.strip().removesuffix(".").strip() for line in run.stdout.strip("\n").split("\n")]
    if len(out) != len(texts):
        raise RuntimeError(f"apertium {pair}: {len(texts)} lines in, {len(out)} out")
    return {t: o for t, o in zip(texts, out, strict=True) if o and not re.search(r"[*#@]", o)}


def _b64(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + _B64.index(c)
    return n


class FreeDict:
    """An English-to-X FreeDict dictionary in dictd format (.index + .dict.dz), read in memory."""

    def __init__(self, lang: str, folder: Path = FREEDICT_DIR):
        stem = Path(folder) / f"freedict-eng-{FREEDICT_LANGS[lang]}"
        self.entries: dict[str, list[tuple[int, int]]] = {}
        for line in stem.with_suffix(".index").read_text(encoding="utf-8").splitlines():
            word, offset, length = line.split("\t")[:3]
            self.entries.setdefault(word.strip().lower(), []).append((_b64(offset), _b64(length)))
        with gzip.open(stem.with_suffix(".dict.dz")) as f:  # dictzip is gzip-compatible
            self.data = f.read()

    @staticmethod
    def exists(lang: str, folder: Path = FREEDICT_DIR) -> bool:
        return (
            lang in FREEDICT_LANGS and (Path(folder) / f"freedict-eng-{FREEDICT_LANGS[lang]}.index").is_file()
        )

    def senses(self, phrase: str) -> list[tuple[set[str], list[str]]]:
        """Per entry of `phrase`: its subject tags and translations ('Pfanne <fem> [cook.]')."""
        out = []
        for offset, length in self.entries.get(phrase.lower(), []):
            lines = self.data[offset : offset + length].decode("utf-8").split("\n")[1:]
            first = next((x.strip() for x in lines if x.strip()), "")
            if first.startswith(("see:", "Synonym:", "Note:", '"')):
                continue
            tags = set(re.findall(r"\[([^\]]*)\]", first))
            first = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)|\{[^}]*\}", "", first)
            words = [w.strip(" .;") for w in re.split(r"[,;]", first)]
            words = [w for w in words if w and not re.search(r"[/=\d]", w) and "  " not in w]
            if words:
                out.append((tags, words))
        return out

    def translate(self, phrase: str, wnid: str = "") -> str | None:
        """The first translation of the whole phrase, from its first entry in the class's field.

        A one-word name has many senses ('lemon' -> 'Dussel' first): for animals, plants and
        food (told by the wnid) an entry tagged with that field wins, and a word with several
        entries and none so tagged is left out.
        """
        senses = self.senses(phrase)
        field = _field(wnid)
        if field and len(senses) > 1:
            senses = [s for s in senses if s[0] & field]
        return senses[0][1][0] if senses else None


_ANIMAL = {"zool.", "ornith.", "entom.", "ichth.", "biol."}
_FOOD = {"cook.", "bot."}


def _field(wnid: str) -> set[str]:
    """Subject tags that fit a class: ImageNet's animals sort before n02666196, food is n07."""
    if "n01000000" <= wnid < "n02666196":
        return _ANIMAL
    if wnid.startswith("n07") or wnid.startswith(("n11", "n12", "n13")):
        return _FOOD
    return set()
