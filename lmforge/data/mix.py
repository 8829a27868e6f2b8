"""Weighted, seeded interleaving of several document streams.

Each draw picks a source with probability weight / (sum of the weights of the sources not yet used up)
and takes its next item. Uniform numbers come from one seeded generator in blocks, so the order depends
only on the seed, the weights and the stream contents, never on timing or chunk sizes.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, Mapping, TypeVar

import numpy as np

from ..core.errors import ConfigError

T = TypeVar("T")
_DRAWS_PER_BLOCK = 4096


class WeightedMixer(Iterator[T]):
    """Iterates over items of several named streams, drawing the source of each item by weight.

    `stopping="all_exhausted"` keeps drawing from the remaining sources (weights renormalised) until all
    are used up; `"first_exhausted"` stops as soon as one runs dry, so realised proportions follow the
    weights (up to sampling noise) at the cost of the other sources' tails.
    """

    def __init__(self, streams: Mapping[str, Iterable[T]], weights: Mapping[str, float], seed: int = 0,
                 stopping: str = "all_exhausted") -> None:
        if set(streams) != set(weights):
            raise ConfigError(f"mix: streams {sorted(streams)} and weights {sorted(weights)} name different sources")
        if stopping not in ("all_exhausted", "first_exhausted"):
            raise ConfigError(f"mix: stopping={stopping!r} is not one of ['all_exhausted', 'first_exhausted']")
        for name, w in weights.items():
            if not w > 0:
                raise ConfigError(f"mix: weight of source {name!r} is {w!r}; weights must be > 0")
        self.names = list(streams)
        self.weights = np.array([float(weights[n]) for n in self.names])
        self.stopping = stopping
        self.drawn: Counter[str] = Counter({n: 0 for n in self.names})
        self._iters = [iter(streams[n]) for n in self.names]
        self._active = np.ones(len(self.names), dtype=bool)
        self._rng = np.random.default_rng([seed, 0x313])
        self._uniform = np.empty(0)
        self._next_uniform = 0
        self._cumulative = np.cumsum(self.weights)
        self._done = not self.names

    def _draw_source(self) -> int:
        if self._next_uniform == len(self._uniform):
            self._uniform = self._rng.random(_DRAWS_PER_BLOCK)
            self._next_uniform = 0
        u = self._uniform[self._next_uniform] * self._cumulative[-1]
        self._next_uniform += 1
        return min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.names) - 1)

    def _retire(self, i: int) -> None:
        self._active[i] = False
        if self.stopping == "first_exhausted" or not self._active.any():
            self._done = True
            return
        self._cumulative = np.cumsum(np.where(self._active, self.weights, 0.0))

    def __next__(self) -> T:
        while not self._done:
            i = self._draw_source()
            if not self._active[i]:  # floating-point edge: a zero-width interval was hit
                continue
            try:
                item = next(self._iters[i])
            except StopIteration:
                self._retire(i)
                continue
            self.drawn[self.names[i]] += 1
            return item
        raise StopIteration

    def proportions(self) -> dict[str, float]:
        """Realised share of items drawn from each source so far."""
        total = sum(self.drawn.values())
        return {n: (self.drawn[n] / total if total else 0.0) for n in self.names}

    def target_proportions(self) -> dict[str, float]:
        """The configured weights normalised to sum to one."""
        return {n: float(w / self.weights.sum()) for n, w in zip(self.names, self.weights)}

    def stats(self) -> dict:
        """Weights, target and realised proportions, documents drawn per source, and the stopping rule."""
        return {"stopping": self.stopping, "weights": dict(zip(self.names, self.weights.tolist())),
                "target_proportions": self.target_proportions(), "realised_proportions": self.proportions(),
                "documents": dict(self.drawn)}
