"""The band-limited steerable lifting basis: e2cnn's span and init, and exact equivariance."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from msr import MSRConv2d, bases
from msr.equivariance import equivariance_error
from msr.groups import get_group
from msr.recovery import principal_angles

E2CNN_BASES = FIXTURES / "e2cnn_c8_d8_bases.npz"


@pytest.fixture(scope="module")
def e2cnn():
    if not E2CNN_BASES.exists():
        pytest.fail(f"{E2CNN_BASES} is missing: see tests/data/README.md")
    with np.load(E2CNN_BASES) as npz:
        return {key: torch.from_numpy(npz[key]) for key in npz.files}


@pytest.mark.parametrize("group", ["c8", "d8"])
def test_span_and_covariance_equal_e2cnn(e2cnn, group):
    """3 regular output fields, 3x3 kernels: the paper's layer (R2Conv of e2cnn 0.2.3)."""
    ours = bases.steerable_lifting2d(group, fields=3, kernel_size=3)
    theirs, their_std = e2cnn[group], e2cnn[f"{group}_coef_std"]
    assert ours.basis.shape == theirs.shape
    assert torch.linalg.matrix_rank(ours.basis.double()) == 18
    assert principal_angles(ours.basis, theirs).max() < 1.0  # degrees
    covariance = (ours.basis.double() * ours.coefficient_std.double() ** 2) @ ours.basis.double().T
    expected = (theirs * their_std**2) @ theirs.T
    assert (covariance - expected).norm() / expected.norm() < 1e-3
    # per output channel, the variance of y = conv(x, W) for x ~ N(0, 1): the paper's data scale
    output_variance = covariance.trace().item() / (theirs.shape[0] // 9)
    assert output_variance == pytest.approx({"c8": 0.625, "d8": 0.5625}[group], abs=1e-4)


@pytest.mark.parametrize("group", ["c8", "d8", "c4", "d5", "c3", "d2"])
@pytest.mark.parametrize("kernel_size, filter_dim", [(3, 6), (5, 11)])
def test_layer_is_exactly_equivariant_on_the_grid(group, kernel_size, filter_dim):
    grp = get_group(group)
    steerable = bases.steerable_lifting2d(group, fields=2, kernel_size=kernel_size)
    # the band limit: 6 of 9 filter directions on 3x3 (rings 0 and 1, frequencies <= 2)
    assert torch.linalg.matrix_rank(steerable.filter_basis.double()) == filter_dim
    assert steerable.basis.shape == (2 * grp.order * kernel_size**2, 2 * filter_dim)
    layer = MSRConv2d.from_basis(steerable.basis, 1, 2 * grp.order, kernel_size, bias=False)
    x = torch.randn(3, 1, 15, 15)
    for g in grp.grid_elements:
        moved_input, moved_output = layer(grp.transform(x, g)), grp.act_regular(layer(x), g)
        assert equivariance_error(moved_input, moved_output) < 1e-6


def test_channels_are_the_identity_filter_rotated():
    """Channel h of a C8 field is the identity channel's continuous filter turned by h * 45 deg:
    at 90 degrees that is an exact pixel rotation, which also fixes the rotation direction."""
    steerable = bases.steerable_lifting2d("c8", fields=1, kernel_size=3)
    kernels = (steerable.basis @ torch.randn(6)).view(8, 3, 3)
    torch.testing.assert_close(steerable.basis[:9], steerable.filter_basis)
    for h in (2, 4, 6):
        torch.testing.assert_close(kernels[h], torch.rot90(kernels[0], h // 2))
    assert (kernels[1] - kernels[0]).abs().max() > 1e-3  # 45 degrees is not the identity
