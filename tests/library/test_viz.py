"""msr.viz: every MSR layer drawn, with titles, labels and colour bars."""

import pytest
import torch
from torch import nn

from msr import MSRConv2d, MSRLinear, bases, viz


def _colour_bars(figure):
    return [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]


def test_a_kronecker_layers_directions_are_those_of_its_dense_U():
    torch.manual_seed(0)
    layer = MSRConv2d(2, 3, 3)
    with torch.no_grad():
        for factor in layer.kronecker_factors():
            factor.add_(0.3 * torch.randn_like(factor))
    ours = viz.layer_directions(layer, 5)
    dense = viz.sharing_directions(layer.sharing_matrix(), tuple(layer.weight.shape), 5)
    for (value, direction), (expected_value, expected) in zip(ours, dense, strict=True):
        assert value == pytest.approx(expected_value, rel=1e-6)
        sign = torch.sign((direction * expected).sum())  # a singular vector's sign is free
        torch.testing.assert_close(sign * direction, expected, rtol=0, atol=1e-6)


def test_a_wide_kronecker_layer_is_drawn_without_building_its_dense_U(monkeypatch):
    layer = MSRConv2d(64, 64, 3)  # a dense U would have (64 * 64 * 9)^2 = 1.4e9 entries
    monkeypatch.setattr(MSRConv2d, "sharing_matrix", lambda self: pytest.fail("built U"))
    figure = viz.plot_layer(layer, count=2)
    assert figure._suptitle.get_text() == repr(layer).replace(", padding", ",\npadding")
    assert len(_colour_bars(figure)) == 2  # one per direction


@pytest.mark.parametrize(
    "layer",
    [
        MSRLinear(6, 5, 3),
        MSRLinear.fully_connected(6, 5),
        MSRLinear.from_basis(bases.conv1d(6, 3), 6, 4),
        MSRConv2d(1, 4, 3),
        MSRConv2d.from_basis(bases.group_conv2d("c4", 1, 2, 3), 1, 8, 3),
    ],
    ids=["msr-linear", "identity", "conv1d-basis", "kronecker-conv", "c4-basis"],
)
def test_every_layer_is_drawn_with_a_title_labels_and_colour_bars(layer):
    figure = viz.plot_layer(layer, title="the layer")
    assert figure._suptitle.get_text() == "the layer"
    assert _colour_bars(figure)
    panels = [ax for ax in figure.axes if ax not in _colour_bars(figure)]
    if isinstance(layer, MSRLinear):
        assert all(ax.get_title() and ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    else:
        assert figure._supxlabel.get_text().startswith("output channel")


def test_what_is_not_an_msr_layer_is_refused():
    with pytest.raises(TypeError, match="not Linear"):
        viz.plot_layer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not both or neither"):
        viz.plot_conv_directions(None, (1, 1, 3, 3))
