"""Model variants the trainer builds: deterministic pooling for train.deterministic=true on CUDA.

python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imagenet_ddp.models import GlobalAvgPool, build_model, deterministic_pooling


@pytest.mark.parametrize("name, pools", [("resnet18", 1), ("efficientnet_b0", 17)])
def test_deterministic_pooling_replaces_every_global_average_pool_and_changes_no_value(name, pools):
    """AdaptiveAvgPool2d's CUDA backward has no deterministic kernel; its replacement (a mean) must give
    torchvision's model the same outputs and gradients and the same state_dict."""
    torch.manual_seed(0)
    reference = build_model(name, num_classes=5)
    model = deterministic_pooling(copy.deepcopy(reference))
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in reference.modules()) == pools  # head + SE blocks
    assert sum(isinstance(m, GlobalAvgPool) for m in model.modules()) == pools
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()  # no dropout or stochastic depth draws: the same function
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
