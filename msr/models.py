"""The standard few-shot backbone: four conv3x3-BatchNorm-ReLU-maxpool blocks."""

from __future__ import annotations

from torch import nn

from msr.layers import MSRConv2d
from msr.norm import TaskBatchNorm
from msr.validation import check_positive_int


def conv4(
    in_channels: int,
    image_size: int,
    hidden: int = 64,
    ways: int | None = None,
    learn_symmetry: bool = False,
) -> nn.Sequential:
    """Conv-4 (Vinyals et al. 2016; MAML): 4 x [conv3x3(hidden), BN, ReLU, maxpool 2], flatten.

    Every conv is an ``MSRConv2d``: with ``learn_symmetry`` its Kronecker U is learned (MSR),
    otherwise frozen at the identity (a plain conv, MAML). ``ways`` adds a linear head; without
    it the net is an embedding (ProtoNets). BatchNorm uses task statistics (``TaskBatchNorm``).
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    check_positive_int("hidden", hidden)
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            MSRConv2d(channels, hidden, 3, padding=1, learn_U=learn_symmetry),
            TaskBatchNorm(hidden),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = hidden, size // 2
    if size < 1:
        raise ValueError(f"image_size={image_size} is too small for four 2x poolings")
    layers.append(nn.Flatten())
    if ways is not None:
        layers.append(nn.Linear(hidden * size * size, check_positive_int("ways", ways)))
    return nn.Sequential(*layers)
