"""Fixed sharing matrices U (vec(W) = U v) for the baselines and for scoring learned symmetries.

Every basis is a dense ``(numel(W), latent)`` 0/1 matrix in the row-major ``vec`` of the weight
it builds: ``(out, in)`` for a linear layer and ``(out, in, k, k)`` for a 2-D conv kernel.
The MAML baselines are ``MSRLinear``/``MSRConv2d`` with one of these frozen as U.
"""

from __future__ import annotations

import torch
from torch import Tensor

from msr.groups import get_group
from msr.validation import check_positive_int


def identity(size: int) -> Tensor:
    """U = I: every weight is free (MAML-FC)."""
    check_positive_int("size", size)
    return torch.eye(size)


def conv1d(in_length: int, kernel_size: int) -> Tensor:
    """Banded Toeplitz basis of a single-channel 'valid' 1-D cross-correlation (MAML-Conv).

    Column j ties every W[p, p + j] together: y[p] = sum_j v[j] x[p + j], as ``nn.Conv1d``.
    Shape ``((in_length - k + 1) * in_length, k)``.
    """
    out_length = _valid_length(in_length, kernel_size)
    basis = torch.zeros(out_length, in_length, kernel_size)
    rows = torch.arange(out_length)
    for j in range(kernel_size):
        basis[rows, rows + j, j] = 1.0
    return basis.reshape(out_length * in_length, kernel_size)


def locally_connected1d(in_length: int, kernel_size: int) -> Tensor:
    """Basis of a single-channel 'valid' 1-D locally connected layer (MAML-LC).

    Column ``p * k + j`` is the lone weight W[p, p + j]: each output position has its own filter.
    Shape ``((in_length - k + 1) * in_length, (in_length - k + 1) * k)``.
    """
    out_length = _valid_length(in_length, kernel_size)
    basis = torch.zeros(out_length, in_length, out_length, kernel_size)
    rows = torch.arange(out_length)
    for j in range(kernel_size):
        basis[rows, rows + j, rows, j] = 1.0
    return basis.reshape(out_length * in_length, out_length * kernel_size)


def group_conv2d(group: str, in_channels: int, filters: int, kernel_size: int) -> Tensor:
    """Basis of a lifting group convolution for C4 or D4 (``group`` = ``"c4"`` / ``"d4"``).

    The free parameters are ``filters`` kernels of shape (in_channels, k, k). Output channel
    ``f * |G| + h`` uses free kernel f transformed by group element h, so the layer maps images
    to regular feature maps and is exactly equivariant (see ``msr.groups.Group.act_regular``).
    Shape ``(filters * |G| * in_channels * k * k, filters * in_channels * k * k)``.
    """
    grp = get_group(group)
    for name, value in (("in_channels", in_channels), ("filters", filters)):
        check_positive_int(name, value)
    check_positive_int("kernel_size", kernel_size)
    latent = filters * in_channels * kernel_size**2
    free = torch.eye(latent).T.reshape(latent, filters, 1, in_channels, kernel_size, kernel_size)
    copies = torch.cat([grp.transform(free, h) for h in range(grp.order)], dim=2)
    return copies.reshape(latent, -1).T.contiguous()


def _valid_length(in_length: int, kernel_size: int) -> int:
    check_positive_int("in_length", in_length)
    check_positive_int("kernel_size", kernel_size)
    if kernel_size > in_length:
        raise ValueError(f"kernel_size={kernel_size} is larger than in_length={in_length}")
    return in_length - kernel_size + 1
