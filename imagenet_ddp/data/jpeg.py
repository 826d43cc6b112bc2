"""JPEG decoding for every loader path: TorchCodec's decoders where installed, torchvision.io's otherwise.

    from imagenet_ddp.data import jpeg
    image = jpeg.decode(file)                          # uint8 [3,H,W] on the CPU (libjpeg-turbo)
    images = jpeg.decode_many(files, device)           # a list, one batched nvJPEG call on CUDA

torchvision 0.29 deprecates its image decoders (a DeprecationWarning on every call) in favour of
TorchCodec's (`torchcodec.decoders.decode_jpeg`, CPU and CUDA, batched), which `pip install
'.[gpu]'`/`make install` brings. Where TorchCodec cannot be imported (an older torch or
torchvision, as on a GPU machine's own stack), torchvision.io's decoders stand in: the same
libjpeg-turbo on the CPU, bit-identical pixels (tested), the same nvJPEG on CUDA. Errors from either
are RuntimeErrors whose text starts with a C++ source location; `reason` keeps the rest.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable

import torch


@functools.cache
def backend() -> tuple[str, Callable]:
    """("torchcodec" | "torchvision", decode_jpeg(source or list, device=...) -> RGB uint8 [3,H,W])."""
    try:
        from torchcodec.decoders import decode_jpeg

        return "torchcodec", functools.partial(decode_jpeg, mode="RGB")
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries do not load here
        from torchvision.io import ImageReadMode, decode_jpeg

        def quiet(source, device="cpu"):
            with warnings.catch_warnings():  # only where TorchCodec, its successor, is missing
                warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
                return decode_jpeg(source, mode=ImageReadMode.RGB, device=device)

        return "torchvision", quiet


def decode(data: torch.Tensor | bytes | memoryview) -> torch.Tensor:
    """One JPEG file (bytes or a 1-D uint8 CPU tensor) -> RGB uint8 [3,H,W] on the CPU."""
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return backend()[1](data)


def decode_many(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files (1-D uint8 CPU tensors) -> RGB uint8 [3,H,W] images on `device`: one call, which on
    a CUDA device is nvJPEG's batched decoder."""
    return backend()[1](files, device=device)


def reason(error: BaseException) -> str:
    """A decoder's error message without its C++ source location."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^.*\.(cpp|cu|h):\d+, ", "", lines[0])
