"""Prototypical networks (Snell et al., 2017) on the same episodic interface as ``MAML``.

Each class's prototype is the mean embedding of its support examples; a query is classified by
softmax over negative squared Euclidean distances to the prototypes. There is no inner loop: the
whole encoder is meta-learned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from msr.episodic import Batching, EpisodicLearner, LossFn, TaskBatch
from msr.grouped import grouped_call
from msr.validation import check_positive_int


class ProtoNet(EpisodicLearner):
    """A ``ways``-way prototypical classifier over ``encoder``'s embeddings (N, D)."""

    def __init__(self, encoder: nn.Module, ways: int, batching: Batching = "vmap") -> None:
        super().__init__(encoder, F.cross_entropy, batching)
        self.ways = check_positive_int("ways", ways)

    def _state(self, detach: bool) -> dict[str, Tensor]:
        return self._model_state(detach)

    def _check(self, tasks: TaskBatch) -> None:
        """Every task's support set must hold every class 0..ways-1: a class without support
        examples has no prototype (its mean would be 0/0 = NaN in every logit). One host read
        of the labels per meta-batch."""
        labels = tasks.y_support
        if labels.is_floating_point() or labels.dim() != 2:
            raise ValueError(
                f"ProtoNet needs integer class labels of shape (tasks, support), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if ((labels < 0) | (labels >= self.ways)).any():
            raise ValueError(f"support labels must be 0..{self.ways - 1} (ways={self.ways})")
        counts = F.one_hot(labels, self.ways).sum(1)  # (tasks, ways)
        if (empty := (counts == 0).nonzero()).numel():
            task, label = empty[0].tolist()
            raise ValueError(
                f"task {task}'s support set has no example of class {label} (of {self.ways}): "
                "ProtoNet needs every class in every support set"
            )

    def logits(
        self, state: dict[str, Tensor], x_support: Tensor, y_support: Tensor, x_query: Tensor
    ) -> Tensor:
        """Negative squared distances of query embeddings to the class prototypes."""
        support = functional_call(self.model, state, (x_support,))
        query = functional_call(self.model, state, (x_query,))
        return self._distances(support, y_support, query)

    def classifier(self, x_support: Tensor, y_support: Tensor) -> Callable[[Tensor], Tensor]:
        """The classifier of one task, for inspection: query images -> logits against the
        prototypes of (``x_support``, ``y_support``), with the current encoder (no graph)."""
        state = self._state(detach=True)
        with torch.no_grad():
            support = functional_call(self.model, state, (x_support,))

        def classify(x_query: Tensor) -> Tensor:
            with torch.no_grad():
                query = functional_call(self.model, state, (x_query,))
            return self._distances(support, y_support, query)

        return classify

    def _distances(self, support: Tensor, y_support: Tensor, query: Tensor) -> Tensor:
        """One task's logits from its support and query embeddings."""
        support, query = support.flatten(1), query.flatten(1)
        one_hot = F.one_hot(y_support, self.ways).to(support.dtype)  # (N_s, ways)
        prototypes = (one_hot.T @ support) / one_hot.sum(0).unsqueeze(1)
        return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)

    def _grouped(
        self, tasks: TaskBatch, metrics: Mapping[str, LossFn], detach: bool
    ) -> dict[str, Tensor]:
        state = self._state(detach)
        support, query = (grouped_call(self.model, state, (), x) for x in tasks[::2])
        logits = vmap(self._distances)(support, tasks.y_support, query)
        return self._scores_per_task(logits, tasks.y_query, metrics)

    def _query(
        self,
        state: dict[str, Tensor],
        x_support: Tensor,
        y_support: Tensor,
        x_query: Tensor,
        y_query: Tensor,
        metrics: Mapping[str, LossFn],
        in_vmap: bool,
    ) -> dict[str, Tensor]:
        logits = self.logits(state, x_support, y_support, x_query)
        return self._scores(logits, y_query, metrics)
