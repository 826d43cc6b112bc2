"""Write the bundled demo dataset, data/tiny-imagenet-demo/, in the exact Tiny ImageNet layout.

    python -m tests.make_demo_data            # from the repository root; rewrites the folder

Ten real Tiny ImageNet classes with their real names; synthetic 64x64 JPEGs (q90) whose
content depends on the class, so a small ResNet learns them in a few CPU epochs. As in the
real dataset a few images are grayscale. The output is committed; the script is
deterministic, and tests/test_fixtures.py checks that it still reproduces it byte for byte.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.fixtures import make_tiny_imagenet

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-imagenet-demo"

# wnids.txt order: unsorted, as in the real file.
CLASSES = {
    "n01770393": "scorpion",
    "n01443537": "goldfish, Carassius auratus",
    "n01774750": "tarantula",
    "n01698640": "American alligator, Alligator mississipiensis",
    "n01641577": "bullfrog, Rana catesbeiana",
    "n01768244": "trilobite",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n01742172": "boa constrictor, Constrictor constrictor",
    "n01644900": "tailed frog, bell toad, ribbed toad, tailed toad, Ascaphus trui",
    "n01774384": "black widow, Latrodectus mactans",
}
# The real words.txt lists all ~82k WordNet nouns; a few of them stand in for the rest.
OTHER_WORDS = {
    "n00001740": "entity",
    "n00001930": "physical entity",
    "n00002137": "abstraction, abstract entity",
    "n00002452": "thing",
    "n00002684": "object, physical object",
    "n00003553": "whole, unit",
    "n00004258": "living thing, animate thing",
    "n00004475": "organism, being",
    "n00015388": "animal, animate being, beast, brute, creature, fauna",
    "n01440764": "tench, Tinca tinca",
    "n01466257": "chordate",
    "n01471682": "vertebrate, craniate",
    "n01514859": "hen",
    "n01530575": "brambling, Fringilla montifringilla",
    "n01627424": "amphibian",
    "n01661091": "reptile, reptilian",
    "n01767661": "arthropod",
    "n01769347": "arachnid, arachnoid",
    "n02084071": "dog, domestic dog, Canis familiaris",
    "n02121808": "domestic cat, house cat, Felis domesticus, Felis catus",
}
GRAYSCALE = (("gray", "gray"), ("gray",))  # two in train, one in val


def make_demo_data(out: Path = DEMO_DIR, seed: int = 2012):
    """Write the demo dataset into `out` (replacing it) and return its Fixture."""
    if out.exists():
        shutil.rmtree(out)
    return make_tiny_imagenet(
        out,
        dirname="",
        classes=CLASSES,
        other_words=OTHER_WORDS,
        per_class=100,
        val_per_class=20,
        test_images=20,
        bad=GRAYSCALE,
        seed=seed,
    )


if __name__ == "__main__":
    fixture = make_demo_data(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_DIR)
    size = sum(p.stat().st_size for p in fixture.src.rglob("*") if p.is_file())
    print(f"wrote {len(fixture.records)} images to {fixture.src} ({size / 1e6:.2f} MB)")
