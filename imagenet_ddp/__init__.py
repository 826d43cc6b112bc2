"""imagenet-ddp: ImageNet-scale image classification training with DDP.

Importing the package does no work: no GPU, no data, no heavy optional dependency.
"""

__version__ = "0.1.0"
