"""Exact group actions and fixed sharing bases."""

import pytest
import torch

from msr import MSRConv2d, MSRLinear, bases
from msr.equivariance import equivariance_error
from msr.groups import C4, D4, get_group


@pytest.mark.parametrize("name, order", [("c4", 4), ("d4", 8), ("c8", 8), ("d8", 16), ("d3", 6)])
def test_group_table_is_a_group(name, order):
    group = get_group(name)
    assert group.order == order
    table = group.cayley
    assert torch.equal(table[0], torch.arange(order))  # identity on the left
    for g in range(order):
        assert sorted(table[g].tolist()) == list(range(order))  # Latin square
        assert table[g, group.inverse[g]] == 0
        for h in range(order):  # the table is the product of the matrices acting on the plane
            product = group.matrices[g] @ group.matrices[h]
            torch.testing.assert_close(product, group.matrices[table[g, h]])
    x = torch.randn(2, 5, 5)
    for g in group.grid_elements:
        for h in group.grid_elements:
            composed = group.transform(group.transform(x, h), g)
            assert torch.equal(composed, group.transform(x, int(table[g, h])))


def test_element_order_and_grid_elements_follow_e2cnn():
    # element f * N + r is r^r f^f; r^1 turns counter-clockwise (y up); f mirrors x -> -x
    d8 = get_group("d8")
    assert d8.grid_elements == (0, 2, 4, 6, 8, 10, 12, 14)
    x = torch.arange(9.0).view(3, 3)
    assert torch.equal(d8.transform(x, 2), torch.rot90(x, 1))  # 90 degrees counter-clockwise
    assert torch.equal(d8.transform(x, 8), torch.flip(x, dims=[1]))
    assert get_group("C8") is get_group("c8")


def test_c4_generator_is_a_quarter_turn():
    x = torch.arange(9.0).view(3, 3)
    assert torch.equal(C4.transform(x, 1), torch.rot90(x, 1))


def test_unknown_group_off_grid_elements_and_non_square_images():
    for name in ("e4", "c0", "c", "d-2"):
        with pytest.raises(ValueError, match=f"unknown group '{name}'"):
            get_group(name)
    with pytest.raises(ValueError, match="element 1 of C8 does not map the pixel grid"):
        get_group("c8").transform(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match=r"C8 has elements 0\.\.7, got 9"):
        get_group("c8").transform(torch.zeros(3, 3), 9)
    with pytest.raises(ValueError, match="4x5"):
        C4.transform(torch.zeros(4, 5), 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        D4.act_regular(torch.zeros(1, 4, 3, 3), 1)


def test_conv1d_basis_equals_nn_conv1d():
    conv = torch.nn.Conv1d(1, 1, 3, bias=False).double()
    layer = MSRLinear.from_basis(bases.conv1d(70, 3), 70, 68).double()
    with torch.no_grad():
        layer.v.copy_(conv.weight.flatten())
    toeplitz = torch.zeros(68, 70, dtype=torch.float64)
    for j in range(3):
        toeplitz[torch.arange(68), torch.arange(68) + j] = conv.weight[0, 0, j]
    assert torch.equal(layer.weight, toeplitz)  # the sharing is exact
    x = torch.randn(16, 70, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x[:, None])[:, 0], rtol=0, atol=1e-12)


def test_locally_connected_basis_gives_one_filter_per_position():
    filters = torch.randn(68, 3, dtype=torch.float64)
    layer = MSRLinear.from_basis(bases.locally_connected1d(70, 3), 70, 68).double()
    with torch.no_grad():
        layer.v.copy_(filters.flatten())
    x = torch.randn(8, 70, dtype=torch.float64)
    expected = (x.unfold(1, 3, 1) * filters).sum(-1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_identity_basis_and_implicit_identity_agree():
    explicit = MSRLinear.from_basis(bases.identity(12), 4, 3)
    implicit = MSRLinear.fully_connected(4, 3)
    with torch.no_grad():
        implicit.v.copy_(explicit.v)
    assert torch.equal(explicit.weight, implicit.weight)
    assert implicit.U is None and not list(implicit.meta_parameters())


@pytest.mark.parametrize("name", ["c4", "d4"])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_group_conv_basis_gives_an_equivariant_layer(name, in_channels):
    group = get_group(name)
    basis = bases.group_conv2d(name, in_channels, filters=3, kernel_size=3)
    out_channels = 3 * group.order
    assert basis.shape == (out_channels * in_channels * 9, 3 * in_channels * 9)
    assert torch.equal(basis.sum(0), torch.full((basis.shape[1],), float(group.order)))
    layer = MSRConv2d.from_basis(basis, in_channels, out_channels, 3, bias=False)
    x = torch.randn(4, in_channels, 16, 16)
    for g in range(group.order):
        moved_input = layer(group.transform(x, g))
        moved_output = group.act_regular(layer(x), g)
        assert equivariance_error(moved_input, moved_output) < 1e-6
    plain = torch.nn.Conv2d(in_channels, out_channels, 3, bias=False)
    assert (
        equivariance_error(plain(group.transform(x, 1)), group.act_regular(plain(x), 1)) > 1e-2
    )  # an unconstrained conv is not equivariant


@pytest.mark.parametrize(
    "name, kronecker_rank",
    [("c4", 4), ("d4", 7), ("steerable c8", 9), ("steerable d8", 17)],
)
def test_no_single_kronecker_product_is_close_to_the_group_conv_projector(name, kronecker_rank):
    """Why the paper's Kronecker MSR-Conv cannot learn group convolution (docs/results.md, Table 2).

    Its inner update is preconditioned by U U^T = (A A^T) (x) (C C^T) over (output channel,
    kernel pixel). The projector P onto the group-conv weights is a sum of several Kronecker
    products (the rank of P rearranged as (out*out, k^4)); the nearest single one misses
    sqrt(2/3) of it, for the exact-grid C4 / D4 bases (there only kernels invariant under the
    group, copied to every group element, are both in span(P) and a Kronecker product: 9 of the
    27 dimensions) and for the paper's steerable C8 / D8 bases alike.
    """
    if name.startswith("steerable"):
        basis = bases.steerable_lifting2d(name.split()[1], 3, 3).basis.double()
    else:
        basis = bases.group_conv2d(name, 1, 3, 3).double()
    out = basis.shape[0] // 9
    Q, _ = torch.linalg.qr(basis)
    rearranged = (Q @ Q.T).view(out, 9, out, 9).permute(0, 2, 1, 3).reshape(out * out, 81)
    singular = torch.linalg.svdvals(rearranged)
    assert int((singular > 1e-9).sum()) == kronecker_rank
    best_single = 1 - singular[0] ** 2 / singular.square().sum()
    torch.testing.assert_close(best_single.sqrt().item(), (2 / 3) ** 0.5)


def test_basis_errors_name_the_value():
    with pytest.raises(ValueError, match="kernel_size=9 is larger than in_length=5"):
        bases.conv1d(5, 9)
    with pytest.raises(ValueError, match="in_length must be a positive integer, got 0"):
        bases.locally_connected1d(0, 3)
    with pytest.raises(ValueError, match="filters must be a positive integer, got -1"):
        bases.group_conv2d("c4", 1, -1, 3)
    with pytest.raises(ValueError, match=r"shape \(12, 2\), got \(3, 2\)"):
        MSRLinear.from_basis(torch.zeros(3, 2), 4, 3)
    with pytest.raises(ValueError, match="C8 cannot do; use steerable_lifting2d"):
        bases.group_conv2d("c8", 1, 3, 3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        bases.steerable_lifting2d("c8", 3, 4)
    with pytest.raises(ValueError, match="fields must be a positive integer, got 0"):
        bases.steerable_lifting2d("d8", 0, 3)
