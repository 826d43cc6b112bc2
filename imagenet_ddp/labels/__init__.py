"""Class names for ImageNet-1k and Tiny ImageNet, in English and other languages.

    from imagenet_ddp.labels import imagenet_names
    imagenet_names("es")["n03400231"]   # -> 'sartén'

    python predict.py --checkpoint runs/demo/best.pt photo.jpg --lang es   # names in Spanish

What predict.py (and its --serve page, --export and --model), make_shards.py and model.init_from
read, with no network. The tables are data files in imagenet_ddp/labels_data/ (imagenet1k.<lang>.json:
names and, per class, the source that gave each name, one of SOURCES; keep.json: names that are the
same as English in that language, each with its reason; reviewed.json: names written and
checked for this project, see the README).
`python -m imagenet_ddp.labels coverage` prints, per language, the count of names from each source
and how many are still English outside the keep-list; `python -m imagenet_ddp.labels build`
regenerates the tables (labels_build.py, which says how). That command line is labels/__main__.py:
these runtime tables never import their builder.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from imagenet_ddp.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "labels_data"
DATASETS = ("imagenet1k", "tiny-imagenet")
SOURCES = (  # best first
    "torchvision",  # English
    "reviewed",  # labels_data/reviewed.json: names written and checked here, fixing the sources below
    "babel-imagenet",
    "multiwordnet",
    "keep-list",  # labels_data/keep.json: the English name is right in this language too
    "google",
    "apertium",  # see labels_offline.py
    "freedict",
    "english-fallback",
)


def available_languages(dataset: str = "imagenet1k") -> list[str]:
    """Languages with a shipped table; Tiny ImageNet shares ImageNet-1k's tables."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return sorted(p.name.split(".")[1] for p in DATA_DIR.glob("imagenet1k.*.json"))


@cache
def _load_table(lang: str) -> dict:
    path = DATA_DIR / f"imagenet1k.{lang}.json"
    if not path.is_file():
        langs = ", ".join(available_languages())
        raise UserError(f"no class names for language {lang!r}; available: {langs}")
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def tiny_imagenet_wnids() -> tuple[str, ...]:
    """The 200 Tiny ImageNet wnids, sorted (= class index order of an ImageFolder)."""
    data = json.loads((DATA_DIR / "tiny-imagenet.wnids.json").read_text(encoding="utf-8"))
    return tuple(data["wnids"])


def imagenet_names(lang: str = "en") -> dict[str, str]:
    """wnid -> class name for the 1000 ImageNet-1k classes, in sorted-wnid (class index) order."""
    return dict(_load_table(lang)["names"])


def tiny_imagenet_names(lang: str = "en") -> dict[str, str]:
    """wnid -> class name for the 200 Tiny ImageNet classes (ImageNet-1k's names)."""
    names = _load_table(lang)["names"]
    return {wnid: names[wnid] for wnid in tiny_imagenet_wnids()}


def name_sources(lang: str = "en") -> dict[str, str]:
    """wnid -> the source of its name in `lang`, one of SOURCES."""
    return {wnid: src for src, wnids in _load_table(lang)["sources"].items() for wnid in wnids}


def _curated(kind: str, folder: Path = DATA_DIR) -> dict[str, dict[str, list[str]]]:
    """keep.json: lang -> wnid -> [English name, why it is right]; reviewed.json: lang -> wnid ->
    [English name, name]. The English name is there for the reader and checked by the builder."""
    path = Path(folder) / f"{kind}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def keep_list(lang: str) -> dict[str, str]:
    """wnid -> why the English name is also the name in `lang` (a reviewed list)."""
    return {wnid: why for wnid, (_, why) in _curated("keep").get(lang, {}).items()}


def untranslated(lang: str) -> list[str]:
    """The wnids whose `lang` name is still the English one (ignoring case), outside the keep-list."""
    english, names, keep = _load_table("en")["names"], _load_table(lang)["names"], keep_list(lang)
    return [w for w in english if w not in keep and names[w].casefold() == english[w].casefold()]
