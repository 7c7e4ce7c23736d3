"""MSR layers: the reparameterization, parameter roles and input checks."""

import pytest
import torch
from torch import nn

from msr import MSRConv2d, MSRLinear, TaskBatchNorm, partition_parameters
from msr.layers import kronecker_sharing


def test_msr_linear_weight_is_reshaped_U_v():
    layer = MSRLinear(5, 4, latent=3)
    assert layer.U.shape == (20, 3) and layer.v.shape == (3,)
    assert torch.equal(layer.weight, (layer.U @ layer.v).view(4, 5))
    x = torch.randn(7, 5)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_dense_U_keeps_its_column_major_storage_through_training_and_reloading():
    """The storage the BLAS-friendly products rely on survives an optimizer step and a reload."""
    given = torch.randn(20, 3)
    for layer in (MSRLinear(5, 4, latent=3), MSRLinear.from_basis(given, 5, 4, learn_U=True)):
        assert layer.U.t().is_contiguous() and layer.U.shape == (20, 3)
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        layer(torch.randn(7, 5)).square().sum().backward()
        optimizer.step()
        reloaded = MSRLinear(5, 4, latent=3, bias=layer.bias is not None)
        reloaded.load_state_dict(layer.state_dict())
        for U in (layer.U, reloaded.U):
            assert U.t().is_contiguous()
        assert torch.equal(reloaded.U, layer.U)
    for source in (given, MSRLinear(5, 4, latent=3).U.detach()):  # row- and column-major
        layer = MSRLinear.from_basis(source, 5, 4)
        assert torch.equal(layer.U, source)
        source.add_(1.0)  # a copy: the caller's tensor can change without touching the layer
        assert not torch.equal(layer.U, source)


def test_msr_linear_init_follows_the_paper():
    layer = MSRLinear(70, 68, latent=30, bias=False)
    assert layer.bias is None
    assert abs(layer.U.std().item() - 0.01) < 1e-3
    big = MSRLinear(10, 50, latent=20000, bias=False)
    assert abs(big.v.std().item() - 1 / 50) < 1e-3


def test_parameter_roles_inside_any_module():
    model = nn.Sequential(
        MSRLinear(6, 5, 4),
        nn.ReLU(),
        nn.Linear(5, 2),
        MSRLinear.from_basis(torch.eye(4), 2, 2),  # frozen U: a buffer, neither role
    )
    meta, fast = partition_parameters(model)
    assert meta == ["0.U"]
    assert fast == ["0.v", "0.bias", "2.weight", "2.bias", "3.v"]
    assert [n for n, _ in model[0].meta_parameters()] == ["U"]
    assert [n for n, _ in model[0].fast_parameters()] == ["v", "bias"]
    assert "U" in dict(model[3].named_buffers())


def test_conv_starts_as_a_plain_conv_exactly():
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    layer = MSRConv2d(3, 8, 3, padding=1, stride=2)
    with torch.no_grad():
        layer.v.copy_(conv.weight)
        layer.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 11, 11)
    assert torch.equal(layer(x), conv(x))
    meta, fast = partition_parameters(layer)
    assert meta == ["U_out", "U_in", "U_kernel"] and fast == ["v", "bias"]
    frozen = MSRConv2d(3, 8, 3, learn_U=False)
    assert partition_parameters(frozen) == ([], ["v", "bias"])


def test_the_sharing_matrix_of_a_linear_layer_is_its_U_or_the_identity():
    layer = MSRLinear(5, 4, latent=3)
    assert layer.sharing_matrix() is layer.U and layer.sharing_matrix().shape == (20, 3)
    fc = MSRLinear.fully_connected(3, 2)
    assert torch.equal(fc.sharing_matrix(), torch.eye(6))
    torch.testing.assert_close(fc.weight.flatten(), fc.sharing_matrix() @ fc.v)
    dense = MSRConv2d.from_basis(torch.randn(2 * 9, 4), 1, 2, 3)
    assert dense.sharing_matrix() is dense.U


def test_conv_kronecker_factors_act_as_the_full_kronecker_U():
    layer = MSRConv2d(2, 3, (2, 3), bias=False).double()
    with torch.no_grad():
        for factor in (layer.U_out, layer.U_in, layer.U_kernel):
            factor.copy_(torch.randn_like(factor))
    U = layer.sharing_matrix()
    # entry ((o, i, k), (p, j, l)) is U_out[o, p] U_in[i, j] U_kernel[k, l]
    by_entry = torch.einsum("op,ij,kl->oikpjl", layer.U_out, layer.U_in, layer.U_kernel)
    torch.testing.assert_close(U, by_entry.reshape(36, 36))
    torch.testing.assert_close(U, kronecker_sharing(layer.U_out, layer.U_in, layer.U_kernel))
    expected = (U @ layer.v.flatten()).view(3, 2, 2, 3)
    torch.testing.assert_close(layer.weight, expected)
    # layer.U is the same matrix, built on access, differentiable in the factors, read-only
    torch.testing.assert_close(layer.U, U)
    layer.U.sum().backward()
    assert layer.U_out.grad is not None and "U" not in dict(layer.named_parameters())
    with pytest.raises(AttributeError, match="read-only"):
        layer.U = U
    with pytest.raises(AttributeError, match="no attribute 'V'"):
        layer.V  # noqa: B018  (other names still fail as on any module)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MSRLinear(0, 3, 2), "in_features must be a positive integer, got 0"),
        (lambda: MSRLinear(3, 3, 2.5), "latent must be a positive integer, got 2.5"),
        (lambda: MSRLinear(3, 2, 4, U=torch.zeros(6, 3)), r"shape \(6, 4\), got \(6, 3\)"),
        (lambda: MSRLinear(3, 2, 5, U="identity", learn_U=False), "latent=6"),
        (lambda: MSRLinear(3, 2, 6, U="identity"), "learn_U=False"),
        (lambda: MSRConv2d(1, 4, 0), "kernel_size must be a positive integer, got 0"),
        (lambda: MSRConv2d(1, 4, 3, padding=-1), "padding must be .* got -1"),
        (lambda: MSRConv2d.from_basis(torch.zeros(10, 2), 1, 4, 3), r"\(36, latent\).*\(10, 2\)"),
    ],
)
def test_bad_configs_raise_with_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs_raise_with_the_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\), got \(2, 4\)"):
        MSRLinear(5, 3, 2)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 8, 8\)"):
        MSRConv2d(3, 4, 3)(torch.zeros(2, 1, 8, 8))


def test_task_batchnorm_equals_batch_statistics_batchnorm():
    norm = TaskBatchNorm(3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    reference = nn.BatchNorm2d(3, track_running_stats=False).double()
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(norm(x), reference(x))
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\), got \(5, 2\)"):
        norm(torch.zeros(5, 2))
