"""Episodes for ``torch.utils.data``: a sampler a ``DataLoader`` (with workers) can drive.

``EpisodeDataset`` is map-style: item ``i`` is the episode drawn from the stream keyed by
(``seed``, ``i``) (``msr.streams.keyed_generator``), so it is the same episode in any worker,
in any order and at any batch size, and a run that resumes at item ``i`` draws what it would
have. The default ``DataLoader`` collation stacks a batch of episodes into one ``TaskBatch``
(the task index first), ready for ``meta_backward`` or ``evaluate``::

    episodes = EpisodeDataset(classes, ways=5, shots=1, queries=15, length=60_000 * 4)
    for tasks in DataLoader(episodes, batch_size=4, num_workers=2):
        learner.meta_backward(tasks)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from msr.data.episodes import ImageClasses, check_episodes, sample_episodes
from msr.episodic import TaskBatch
from msr.streams import keyed_generator
from msr.validation import check_positive_int


class EpisodeDataset(Dataset[TaskBatch]):
    """``length`` seeded ``ways``-way ``shots``-shot episodes of ``classes`` (``queries``
    query images per class; ``augment_query`` transforms them, as in ``sample_episodes``),
    each a ``TaskBatch`` of one task without its task dimension."""

    def __init__(
        self,
        classes: ImageClasses,
        ways: int,
        shots: int,
        queries: int,
        length: int,
        seed: int = 0,
        augment_query: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        check_episodes(classes, ways, shots, queries)  # refused here, not in a worker
        self.classes, self.ways, self.shots, self.queries = classes, ways, shots, queries
        self.length = check_positive_int("length", length)
        self.seed, self.augment_query = seed, augment_query

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TaskBatch:
        if not 0 <= index < self.length:
            raise IndexError(f"episode {index} of {self.length}")
        generator = keyed_generator(self.seed, index, self.classes.flat.device)
        episode = sample_episodes(
            self.classes, 1, self.ways, self.shots, self.queries, generator, self.augment_query
        )
        return episode.task(0)
