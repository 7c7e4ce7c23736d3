"""msr.testing's TF32 emulation rounds what TF32 rounds, to any order of differentiation. What
it says about the few-shot meta-gradient (TF32 moves it far less than the next meta-batch does)
is a measurement: ``python -m benchmarks.precision`` prints it, and scripts/gpu_checks.sh runs
it against the real TF32 on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from msr.testing import TF32_DROPPED_BITS, round_mantissa, tf32_emulation


def test_round_mantissa_keeps_ten_bits_and_rounds_to_nearest():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    rounded = round_mantissa(x, TF32_DROPPED_BITS)
    assert (rounded.view(torch.int32) & (2**TF32_DROPPED_BITS - 1) == 0).all()
    assert ((rounded - x).abs() <= x.abs() * 2.0**-11).all()  # half a unit of TF32's last place
    assert ((rounded - x).abs() > x.abs() * 2.0**-14).float().mean() > 0.5  # it did round
    one_and_a_half_units = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11)])
    torch.testing.assert_close(  # ties go away from zero
        round_mantissa(one_and_a_half_units, TF32_DROPPED_BITS),
        torch.tensor([1 + 2.0**-10, -(1 + 4 * 2.0**-11)]),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("bad", [(torch.float64, 13), (torch.float32, 0), (torch.float32, 23)])
def test_round_mantissa_refuses_what_it_cannot_round(bad):
    dtype, bits = bad
    with pytest.raises(ValueError, match="fp32"):
        round_mantissa(torch.ones(2, dtype=dtype), bits)


def test_tf32_emulation_rounds_conv_inputs_and_the_gradient_into_the_conv():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator)
    upstream = torch.randn(2, 4, 6, 6, generator=generator)

    def rounded(t):
        return round_mantissa(t, TF32_DROPPED_BITS)

    with tf32_emulation():
        out = F.conv2d(x, w, bias)
        (grad_x,) = torch.autograd.grad(out, x, upstream, create_graph=True)
    # the bias is added in fp32, unrounded
    torch.testing.assert_close(out, F.conv2d(rounded(x), rounded(w), bias), rtol=0, atol=0)
    expected = torch.nn.grad.conv2d_input(x.shape, rounded(w), rounded(upstream))
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0)
    (second,) = torch.autograd.grad(grad_x.square().sum(), w)  # differentiable again
    assert second.isfinite().all() and second.abs().sum() > 0
