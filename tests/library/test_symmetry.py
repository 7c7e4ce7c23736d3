"""Symmetry-recovery scores on spans with known answers."""

import math

import pytest
import torch
from torch import nn

from msr import MSRConv2d, MSRLinear, TaskBatch, bases
from msr.equivariance import (
    adapted_group_equivariance_error,
    adapted_image_symmetry,
    adapted_translation_equivariance_error,
    equivariance_error,
    image_symmetry_errors,
    transform_images,
    translation_equivariance_error,
)
from msr.groups import get_group
from msr.recovery import (
    effective_basis,
    energy_share,
    factor_singular_values,
    grassmann_distance,
    kernel_mode_matrix,
    nearest_group,
    principal_angles,
    recovery_scores,
    subspace_recall,
)


def test_scores_ignore_the_basis_within_a_span():
    B = bases.conv1d(12, 3).double()
    mixed = B @ torch.randn(3, 3, dtype=torch.float64)  # same span, other coordinates
    assert principal_angles(mixed, B).max() < 1e-5
    assert subspace_recall(mixed, B) == pytest.approx(1.0)
    assert energy_share(mixed, B) == pytest.approx(1.0)


def test_scores_of_orthogonal_and_partial_spans():
    e = torch.eye(6, dtype=torch.float64)
    assert principal_angles(e[:, :2], e[:, 2:4]).tolist() == pytest.approx([90.0, 90.0])
    assert subspace_recall(e[:, :3], e[:, 1:5]) == pytest.approx(0.5)  # 2 of 4 directions
    tilted = (e[:, 0] + e[:, 1]).unsqueeze(1)
    assert principal_angles(tilted, e[:, :1]).item() == pytest.approx(45.0)
    assert energy_share(tilted, e[:, :1]) == pytest.approx(0.5)


def test_translation_equivariance_error_separates_conv_from_random():
    conv = (bases.conv1d(20, 3) @ torch.randn(3)).view(18, 20)
    assert translation_equivariance_error(conv) < 1e-12
    assert translation_equivariance_error(torch.randn(18, 20)) > 0.3
    with pytest.raises(ValueError, match=r"\[1, 17\], got 18"):
        translation_equivariance_error(conv, shift=18)


def test_equivariance_error_scale():
    a = torch.randn(100)
    assert equivariance_error(a, a) == 0.0
    assert equivariance_error(a, -a) == pytest.approx(1.0)
    assert equivariance_error(a, torch.zeros(100)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        equivariance_error(a, a[:3])
    assert math.isclose(equivariance_error(torch.zeros(3), torch.zeros(3)), 0.0)


def test_effective_basis_keeps_the_strong_directions():
    rotation = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    U = (
        torch.diag(torch.tensor([10.0, 10.0, 2.0, 0.01])).double() @ torch.linalg.qr(rotation)[0]
    )  # the right factor does not change span or strengths
    assert effective_basis(U).shape == (4, 3)  # 2 is over 10% of 10, 0.01 under
    assert effective_basis(U, rtol=0.5).shape == (4, 2)
    assert effective_basis(U, rtol=1e-4).shape == (4, 4)
    assert (
        principal_angles(effective_basis(U), torch.eye(4)[:, :3].double()).max() < 1e-5
    )  # degrees
    with pytest.raises(ValueError, match="rtol must be in"):
        effective_basis(U, rtol=0.0)


def test_grassmann_distance_counts_angles_and_missing_dimensions():
    e = torch.eye(6, dtype=torch.float64)
    assert grassmann_distance(e[:, :2], e[:, :2] @ torch.randn(2, 2).double()) < 1e-5
    assert grassmann_distance(e[:, :2], e[:, 2:4]) == pytest.approx(math.sqrt(2) * 90)
    # a subspace of the other: only the dimension mismatch counts
    assert grassmann_distance(e[:, :1], e[:, :4]) == pytest.approx(math.sqrt(3) * 90)
    tilted = (e[:, 0] + e[:, 1]).unsqueeze(1)
    assert grassmann_distance(tilted, e[:, :1]) == pytest.approx(45.0)


def test_kernel_mode_of_a_kronecker_u_has_the_kernel_factor_spectrum():
    A, C = torch.randn(4, 4).double(), torch.randn(9, 9).double()
    U = torch.kron(torch.kron(A, torch.eye(1).double()), C)  # (out, in, pixel) order
    expected = torch.linalg.svdvals(C) * A.norm()
    torch.testing.assert_close(torch.linalg.svdvals(kernel_mode_matrix(U, 9)), expected)
    with pytest.raises(ValueError, match="not a multiple of 9 pixels"):
        kernel_mode_matrix(torch.zeros(10, 2), 9)


def test_recovery_scores_of_the_true_span_and_of_a_random_one():
    B = bases.conv1d(12, 3).double()
    found = recovery_scores(B @ torch.randn(3, 3, dtype=torch.float64), B)
    assert found["max_principal_angle_deg"] < 1e-5 and found["recall"] == pytest.approx(1.0)
    assert found["chance_recall"] == 3 / B.shape[0]
    missed = recovery_scores(torch.randn(B.shape[0], 3, dtype=torch.float64), B)
    assert missed["max_principal_angle_deg"] > 45 and missed["recall"] < 0.5


def test_nearest_group_names_the_candidate_that_holds_u():
    conv, local = bases.conv1d(12, 3).double(), bases.locally_connected1d(12, 3).double()
    candidates = {"conv": conv, "locally connected": local}
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]  # keeps all 3 strong
    found = nearest_group(conv @ rotation, candidates)
    assert found["nearest_group"] == found["discovered_group"] == "conv"
    assert found["group_distances_deg"]["conv"] < 1e-3 and found["effective_rank"] == 3
    # a random U is nearest to something but held by nothing: not discovered
    lost = nearest_group(torch.randn(conv.shape[0], 3, dtype=torch.float64), candidates)
    assert lost["discovered_group"] is None and lost["energy_in_nearest_group"] < 0.9
    with pytest.raises(ValueError, match="no candidate bases"):
        nearest_group(conv, {})


def _tasks(x_support, x_query):
    return TaskBatch(x_support, torch.zeros(len(x_support)), x_query, torch.zeros(len(x_query)))


def test_an_adapted_convolution_is_translation_equivariant_and_a_dense_layer_is_not():
    conv = MSRLinear.from_basis(bases.conv1d(12, 3), 12, 10)
    dense = MSRLinear(12, 10, latent=20)
    tasks = _tasks(torch.randn(8, 4, 12), torch.randn(8, 4, 12))
    assert adapted_translation_equivariance_error(lambda x, y: conv, tasks) < 1e-6
    assert adapted_translation_equivariance_error(lambda x, y: dense, tasks) > 0.5


def test_an_adapted_group_convolution_is_group_equivariant_and_a_plain_one_is_not():
    group = get_group("c4")
    lifting = MSRConv2d.from_basis(bases.group_conv2d("c4", 1, 2, 3), 1, 8, 3, bias=False)
    plain = MSRConv2d(1, 8, 3, bias=False)
    tasks = _tasks(torch.randn(3, 2, 1, 7, 7), torch.randn(3, 2, 1, 7, 7))
    assert adapted_group_equivariance_error(lambda x, y: lifting, tasks, group) < 1e-6
    assert adapted_group_equivariance_error(lambda x, y: plain, tasks, group) > 0.1


def test_image_transforms_are_the_augmentations_elements():
    x = torch.randn(2, 3, 1, 8, 8)
    assert torch.equal(transform_images(x, "h-flip"), x.flip(-1))
    assert torch.equal(transform_images(x, "v-flip"), x.flip(-2))
    assert torch.equal(transform_images(transform_images(x, "rot90"), "rot90"), x.flip(-1, -2))
    # a smooth image turned by +30 then -30 degrees is itself away from the corners
    grid = torch.linspace(-1, 1, 33)
    blob = torch.exp(-8 * (grid[:, None] ** 2 + (grid[None, :] - 0.2) ** 2))
    back = transform_images(transform_images(blob, "rot+30"), "rot-30")
    assert (back - blob)[8:25, 8:25].abs().max() < 0.05
    assert (transform_images(blob, "rot+30") - blob).abs().max() > 0.2
    with pytest.raises(ValueError, match="unknown transform 'rot45'"):
        transform_images(x, "rot45")


def test_image_symmetry_errors_tell_an_equivariant_block_from_one_that_is_not():
    """A conv whose kernel is mirror-symmetric, then a 2x2 max-pool, commutes with h-flip (not
    with v-flip); a global average then makes the scores h-flip invariant."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        kernel = torch.randn(2, 1, 3, 3)
        conv.weight.copy_(kernel + kernel.flip(-1))
    network = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))

    def classify(x):
        return network(x).mean((-2, -1))

    x = torch.randn(6, 1, 8, 8)
    flipped = image_symmetry_errors(network, classify, x, "h-flip")
    assert flipped["blocks"][0] < 1e-6 and flipped["logits"] < 1e-6
    assert flipped["agreement"] == 1.0
    upside_down = image_symmetry_errors(network, classify, x, "v-flip")
    assert upside_down["blocks"][0] > 0.1


def test_adapted_image_symmetry_averages_over_tasks_and_factor_singular_values():
    network = nn.Sequential(MSRConv2d(1, 3, 3, padding=1), nn.MaxPool2d(2), nn.Flatten())
    tasks = TaskBatch(*(torch.randn(4, 5, 1, 6, 6) for _ in range(2)), torch.randn(4, 5, 1, 6, 6),
                      torch.zeros(4, 5))  # fmt: skip
    found = adapted_image_symmetry(lambda x, y: (network, network), tasks, ["h-flip", "rot90"])
    assert list(found) == ["h-flip", "rot90"] and len(found["rot90"]["blocks"]) == 1
    single = [
        image_symmetry_errors(network, network, tasks.x_query[i], "rot90")["blocks"][0]
        for i in range(4)
    ]
    assert found["rot90"]["blocks"][0] == pytest.approx(sum(single) / 4)
    with torch.no_grad():
        network[0].U_out.copy_(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
    values = factor_singular_values(network)
    assert list(values) == ["0"] and values["0"]["U_out"] == pytest.approx([3.0, 2.0, 1.0])
    assert values["0"]["U_kernel"] == pytest.approx([1.0] * 9)


def test_the_old_symmetry_module_forwards_each_name_with_a_deprecation_warning():
    import msr.recovery
    import msr.symmetry

    with pytest.warns(DeprecationWarning, match=r"msr.symmetry.nearest_group is now msr.recovery"):
        assert msr.symmetry.nearest_group is msr.recovery.nearest_group
    with pytest.warns(DeprecationWarning, match="msr.equivariance.transform_images"):
        from msr.symmetry import transform_images  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'no_such_score'"):
        msr.symmetry.no_such_score  # noqa: B018
