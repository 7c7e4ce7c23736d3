"""The 1-D translation data: conv targets for k=1, rank-k locally connected targets for k>1."""

import pytest
import torch
import torch.nn.functional as F

from msr import bases
from synthetic.translation1d import Translation1D


def _all_examples(data, indices):
    tasks, coefficients = data.tasks(indices)
    x = torch.cat([tasks.x_support, tasks.x_query], dim=1)
    y = torch.cat([tasks.y_support, tasks.y_query], dim=1)
    return x, y, coefficients


def test_k1_targets_are_a_convolution_of_the_input():
    data = Translation1D(1, seed=3)
    x, y, w = _all_examples(data, torch.arange(5))
    assert x.shape == (5, 20, 70) and y.shape == (5, 20, 68) and w.shape == (5, 1, 3)
    for t in range(5):
        conv = F.conv1d(x[t][:, None], w[t].view(1, 1, 3))[:, 0]
        torch.testing.assert_close(y[t], conv, rtol=0, atol=1e-5)
    assert torch.equal(data.true_basis(), bases.conv1d(70, 3))
    assert 2.0 < y.var().item() < 4.0  # Var(y) = ||w||^2, about 3


@pytest.mark.parametrize("k", [2, 5])
def test_partial_symmetry_targets_follow_the_rank_k_structure(k):
    data = Translation1D(k, seed=1)
    x, y, coefficients = _all_examples(data, torch.tensor([0, 7, 9000]))
    connectivity = data.connectivity
    assert connectivity.shape == (68, k)
    torch.testing.assert_close(connectivity.sum(1), torch.ones(68))
    filters = connectivity @ coefficients  # (T, 68, 3): per-position filters of rank k
    assert torch.linalg.matrix_rank(filters[0]) == min(k, 3)
    expected = torch.einsum("tpj,tnpj->tnp", filters, x.unfold(-1, 3, 1))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    weights = data.weights(coefficients)
    torch.testing.assert_close(torch.einsum("tpi,tni->tnp", weights, x), y, rtol=0, atol=1e-5)
    basis = data.true_basis()
    assert basis.shape == (68 * 70, 3 * k) and torch.linalg.matrix_rank(basis) == 3 * k
    # The generator's weights lie in span(true basis), inside the locally connected span.
    lc = bases.locally_connected1d(70, 3)
    residual = lc @ torch.linalg.lstsq(lc, basis).solution - basis
    assert residual.abs().max() < 1e-5


def test_tasks_are_reproducible_streamed_and_split():
    data = Translation1D(2, seed=0)
    first, _ = data.tasks(torch.tensor([4, 5]))
    again, _ = data.tasks(torch.tensor([5]))
    assert torch.equal(first.x_query[1], again.x_query[0])
    assert first.x_support.shape == (2, 1, 70) and first.x_query.shape == (2, 19, 70)
    assert not torch.equal(Translation1D(2, seed=1).connectivity, data.connectivity)
    test = data.test_indices(300)
    assert test.min() == data.num_train_tasks == 8000 and len(test) == 300
    batch = data.sample_train(32, torch.Generator().manual_seed(0))
    indices = torch.randint(8000, (32,), generator=torch.Generator().manual_seed(0))
    assert indices.max() < 8000  # the training pool only
    assert torch.equal(batch.y_query, data.tasks(indices)[0].y_query)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: Translation1D(0), "k must be a positive integer, got 0"),
        (lambda: Translation1D(1, kernel_size=9, in_length=5), "kernel_size=9 > in_length=5"),
        (lambda: Translation1D(1, train_fraction=1.0), "train_fraction=1.0"),
        (lambda: Translation1D(1).tasks(torch.tensor([10_000])), r"\[0, 10000\)"),
        (lambda: Translation1D(1).tasks(torch.tensor([0]), support=20), "got 20"),
        (lambda: Translation1D(1).test_indices(2001), r"\[1, 2000\], got 2001"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
