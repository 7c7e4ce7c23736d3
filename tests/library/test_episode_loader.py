"""msr.data.EpisodeDataset: seeded episodes through a torch DataLoader, workers included."""

import pytest
import torch
from conftest import FIXTURE_NPZ
from torch.utils.data import DataLoader

from msr import MAML, TaskBatch
from msr.data import EpisodeDataset, augment_images, load_omniglot, sample_episodes
from msr.models import conv4
from msr.streams import keyed_generator

NPZ = FIXTURE_NPZ


@pytest.fixture(scope="module")
def classes():
    return load_omniglot(NPZ, "vinyals-val")  # real Omniglot characters


def test_item_i_is_the_episode_of_stream_i(classes):
    episodes = EpisodeDataset(classes, 5, 1, 3, length=10, seed=7, augment_query=augment_images)
    expected = sample_episodes(classes, 1, 5, 1, 3, keyed_generator(7, 4), augment_images)
    item = episodes[4]
    assert isinstance(item, TaskBatch) and item.x_support.shape == (5, 1, 28, 28)
    for ours, theirs in zip(item, expected.task(0), strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(episodes[5].x_support, item.x_support)
    with pytest.raises(IndexError, match="episode 10 of 10"):
        episodes[10]


def test_a_dataloader_with_workers_gives_the_same_task_batches(classes):
    episodes = EpisodeDataset(classes, 5, 1, 2, length=8, seed=3)
    alone = list(DataLoader(episodes, batch_size=4))
    workers = list(DataLoader(episodes, batch_size=4, num_workers=2))
    assert len(alone) == len(workers) == 2
    for ours, theirs in zip(alone, workers, strict=True):
        assert isinstance(ours, TaskBatch) and ours.x_support.shape == (4, 5, 1, 28, 28)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    learner = MAML(conv4(1, 28, hidden=4, ways=5), torch.nn.functional.cross_entropy)
    assert learner.meta_backward(alone[0]).shape == (4,)  # a batch is a meta-batch


def test_impossible_episodes_are_refused_before_any_worker_starts(classes):
    with pytest.raises(ValueError, match="shots"):
        EpisodeDataset(classes, 5, 0, 3, length=4)
    with pytest.raises(ValueError, match="length must be a positive integer"):
        EpisodeDataset(classes, 5, 1, 3, length=0)
