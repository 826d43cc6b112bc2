"""The DALI backend's nvJPEG decoders on a GPU: what the train and the val pipeline each get. No GPU
here to run them: their arguments and the pipelines' serialized graphs are checked (DALI builds the
graph of a `mixed` decoder without a device).

python -m pytest tests/test_dali_decoders.py -q
"""

from __future__ import annotations

import pytest

from imagenet_ddp.data import DataConfig, build_loader
from tests.test_train import make_tiny_shards

pytestmark = pytest.mark.needs("nvidia.dali")

PREALLOCATION = (
    "device_memory_padding",
    "host_memory_padding",
    "preallocate_width_hint",
    "preallocate_height_hint",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def graph(shards, split: str) -> tuple[dict, bytes]:
    """The decoder arguments of a CUDA device's pass over `split` (the defaults: NVIDIA's ResNet-50
    sizes), and the serialized graph of its pipeline."""
    from imagenet_ddp.data.dali_graph import pipeline

    cfg = DataConfig(root=str(shards), backend="dali", image_size=32, eval_size=32, batch_size=8, workers=1)
    with build_loader(cfg, split, device="cuda:0", train=split == "train") as loader:
        args, _ = loader._pipeline_args(0)  # nothing touches the GPU until a pass
    assert args["decoder"] == "mixed"
    return args["decoder_args"], pipeline(**{**args, "device_id": None}).serialize()


def test_only_the_train_decoder_preallocates_for_the_largest_image(shards):
    """As in NVIDIA's DALI ResNet-50 example: the val decoder, running while the next epoch's train
    pipeline is built, takes DALI's default buffers; both decode with libjpeg's upsampling."""
    train, train_graph = graph(shards, "train")
    val, val_graph = graph(shards, "val")
    assert (train["preallocate_width_hint"], train["preallocate_height_hint"]) == (5980, 6430)
    assert (train["device_memory_padding"], train["host_memory_padding"]) == (211_025_920, 140_544_512)
    assert val == {"hw_decoder_load": 0.65, "jpeg_fancy_upsampling": True}
    assert b"decoders__ImageRandomCrop" in train_graph
    assert b"decoders__Image" in val_graph and b"decoders__ImageRandomCrop" not in val_graph
    for name in PREALLOCATION:
        assert name.encode() in train_graph and name.encode() not in val_graph, name
    assert b"jpeg_fancy_upsampling" in val_graph and b"hw_decoder_load" in val_graph
