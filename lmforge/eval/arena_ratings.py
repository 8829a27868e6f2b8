"""Ratings from pairwise battles: online Elo, Bradley–Terry by maximum likelihood, bootstrap CIs, leaderboard.

A battle is (model_a, model_b, winner) with winner one of "model_a", "model_b", "tie", "both_bad"; both
rating methods count "both_bad" as a tie (neither answer was better), as Chatbot Arena does.

- **Elo** (online): every model starts at `base` (1000); after each battle, in order,
  R_a += K (S_a - E_a), R_b += K (S_b - E_b) with E_a = 1 / (1 + 10^((R_b - R_a) / scale)), scale 400,
  S = 1 for a win, 0.5 for a tie. Order matters: the same battles shuffled give other ratings.
- **Bradley–Terry**: P(i beats j) = p_i / (p_i + p_j). The strengths p maximise the likelihood of all
  battles at once (order-free), a tie counting as half a win for each side. Fitted with Hunter's (2004)
  minorise–maximise iteration p_i <- W_i / sum_j n_ij / (p_i + p_j), which increases the likelihood every
  step. A model that never lost has no finite MLE, so `prior` adds that many virtual tie battles between
  every pair of models that appear (default 0.01: negligible with real data, keeps every fit finite).
  Reported on the Elo scale, R_i = base + scale * log10(p_i), centred so the mean rating is `base`; then
  P(i beats j) = 1 / (1 + 10^((R_j - R_i) / scale)) as for Elo.
- **Bootstrap**: resample the battles with replacement `rounds` times (numpy Generator, `seed`), refit each
  time (Elo: on the resample in its drawn order), and take the 2.5 / 97.5 percentiles of each model's
  ratings: a 95% interval. Same seed, same intervals. Resamples come in random order, so for Elo the
  interval (and the bootstrap median the JSON also reports) spans orders too, and the online rating on
  the given order can fall outside it: with 10 models 40 points apart and 10k simulated battles, Elo
  (K=16) misordered two pairs that Bradley–Terry ranked correctly. Prefer Bradley–Terry for a
  leaderboard; Elo is there because it is the familiar, incremental number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ..core.errors import ConfigError

WINNERS = ("model_a", "model_b", "tie", "both_bad")
Method = Literal["elo", "bt"]


@dataclass(frozen=True)
class Battle:
    """One comparison: which of two models answered better (or a tie / both bad)."""

    model_a: str
    model_b: str
    winner: str

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner={self.winner!r} is not one of {'|'.join(WINNERS)}")
        if self.model_a == self.model_b:
            raise ValueError(f"a battle needs two different models, got {self.model_a!r} twice")

    @property
    def score_a(self) -> float:
        """Model A's result: 1 win, 0 loss, 0.5 tie or both bad."""
        return {"model_a": 1.0, "model_b": 0.0}.get(self.winner, 0.5)


def as_battles(items: Iterable[Battle | Mapping[str, Any]]) -> list[Battle]:
    """Battles from Battle objects or {"model_a", "model_b", "winner"} mappings."""
    return [b if isinstance(b, Battle) else Battle(str(b["model_a"]), str(b["model_b"]), str(b["winner"]))
            for b in items]


def model_names(battles: Sequence[Battle]) -> list[str]:
    """Every model that appears, sorted (the order of rating vectors)."""
    return sorted({b.model_a for b in battles} | {b.model_b for b in battles})


def _check_params(k: float = 16.0, scale: float = 400.0) -> None:
    if not k > 0:
        raise ConfigError(f"elo k={k} must be > 0")
    if not scale > 0:
        raise ConfigError(f"rating scale={scale} must be > 0")


def elo_ratings(battles: Sequence[Battle], k: float = 16.0, scale: float = 400.0, base: float = 1000.0,
                models: Sequence[str] | None = None) -> dict[str, float]:
    """Online Elo over `battles` in the given order (see the module docstring)."""
    _check_params(k, scale)
    ratings = {name: base for name in (models or model_names(battles))}
    for b in battles:
        ra, rb = ratings[b.model_a], ratings[b.model_b]
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale))
        delta = k * (b.score_a - expected_a)
        ratings[b.model_a], ratings[b.model_b] = ra + delta, rb - delta
    return ratings


def _encode(battles: Sequence[Battle], index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Battles as arrays: model A's index, model B's index, A's score."""
    a = np.fromiter((index[b.model_a] for b in battles), dtype=np.int64, count=len(battles))
    b = np.fromiter((index[b.model_b] for b in battles), dtype=np.int64, count=len(battles))
    score = np.fromiter((b.score_a for b in battles), dtype=np.float64, count=len(battles))
    return a, b, score


def _win_matrix(a: np.ndarray, b: np.ndarray, score: np.ndarray, n: int, prior: float) -> np.ndarray:
    """wins[i, j] = times i beat j (ties count half to each), plus prior/2 virtual ties per pair."""
    wins = np.zeros((n, n))
    np.add.at(wins, (a, b), score)
    np.add.at(wins, (b, a), 1.0 - score)
    if prior > 0:
        wins += prior / 2.0 * (1.0 - np.eye(n))
    return wins


def bradley_terry_strengths(wins: np.ndarray, max_iter: int = 10_000, tol: float = 1e-10) -> np.ndarray:
    """MLE strengths p (geometric mean 1) from a win matrix, by the MM iteration.

    Raises ConfigError when some model has no (fractional) win or the comparison graph is disconnected,
    the cases where the MLE does not exist (use prior > 0)."""
    n = wins.shape[0]
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    if n == 0:
        return np.zeros(0)
    if np.any(total_wins <= 0):
        raise ConfigError("Bradley–Terry has no finite fit: some model never won or tied; use prior > 0")
    if not _connected(games > 0):
        raise ConfigError("Bradley–Terry needs every model linked to every other by battles; "
                          "the battle graph is disconnected (use prior > 0)")
    p = np.ones(n)
    for _ in range(max_iter):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = total_wins / denom
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            return new
        p = new
    return p


def _connected(adjacent: np.ndarray) -> bool:
    n = adjacent.shape[0]
    seen, stack = {0}, [0]
    while stack:
        node = stack.pop()
        for other in np.flatnonzero(adjacent[node]).tolist():
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return len(seen) == n


def bt_ratings(battles: Sequence[Battle], scale: float = 400.0, base: float = 1000.0, prior: float = 0.01,
               models: Sequence[str] | None = None) -> dict[str, float]:
    """Bradley–Terry ratings on the Elo scale, mean `base` (see the module docstring)."""
    _check_params(scale=scale)
    if prior < 0:
        raise ConfigError(f"bradley-terry prior={prior} must be >= 0")
    names = list(models or model_names(battles))
    a, b, score = _encode(battles, {m: i for i, m in enumerate(names)})
    ratings = _bt_from_wins(_win_matrix(a, b, score, len(names), prior), scale, base)
    return dict(zip(names, ratings.tolist()))


def _bt_from_wins(wins: np.ndarray, scale: float, base: float) -> np.ndarray:
    """Elo-scale ratings (mean `base`) from a win matrix."""
    return base + scale * np.log10(bradley_terry_strengths(wins))


def fit_ratings(battles: Sequence[Battle], method: Method = "bt", *, k: float = 16.0, scale: float = 400.0,
                base: float = 1000.0, prior: float = 0.01, models: Sequence[str] | None = None) -> dict[str, float]:
    """Ratings by `method` ("elo" or "bt")."""
    if method == "elo":
        return elo_ratings(battles, k, scale, base, models)
    if method == "bt":
        return bt_ratings(battles, scale, base, prior, models)
    raise ConfigError(f"rating method={method!r} is not 'elo' or 'bt'")


def bootstrap_ratings(battles: Sequence[Battle], method: Method = "bt", rounds: int = 200, seed: int = 0,
                      **kwargs: Any) -> dict[str, np.ndarray]:
    """Each model's ratings over `rounds` resamples of the battles (a model absent from a resample keeps
    its rating undefined: NaN)."""
    if rounds < 1:
        raise ConfigError(f"bootstrap rounds={rounds} must be >= 1")
    names = model_names(battles)
    rng = np.random.default_rng(seed)
    samples = {name: np.full(rounds, np.nan) for name in names}
    a, b, score = _encode(battles, {m: i for i, m in enumerate(names)})
    for r in range(rounds):
        picked = rng.integers(0, len(battles), size=len(battles))
        if method == "bt":  # vectorised: only the win matrix of the resample is needed
            present = np.flatnonzero(np.bincount(np.concatenate([a[picked], b[picked]]), minlength=len(names)))
            remap = np.full(len(names), -1)
            remap[present] = np.arange(len(present))
            ratings = _bt_from_wins(_win_matrix(remap[a[picked]], remap[b[picked]], score[picked], len(present),
                                                kwargs.get("prior", 0.01)), kwargs.get("scale", 400.0),
                                    kwargs.get("base", 1000.0))
            for k, value in zip(present.tolist(), ratings.tolist()):
                samples[names[k]][r] = value
            continue
        picked_battles = [battles[i] for i in picked.tolist()]
        for name, value in fit_ratings(picked_battles, method, models=model_names(picked_battles), **kwargs).items():
            samples[name][r] = value
    return samples


def confidence_intervals(samples: Mapping[str, np.ndarray], level: float = 0.95) -> dict[str, tuple[float, float]]:
    """(lower, upper) percentile interval of each model's bootstrap ratings (NaNs left out)."""
    tail = (1.0 - level) / 2.0 * 100.0
    out = {}
    for name, values in samples.items():
        finite = values[np.isfinite(values)]
        out[name] = ((float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
                     if finite.size else (float("nan"), float("nan")))
    return out


@dataclass
class LeaderboardRow:
    rank: int
    model: str
    rating: float
    ci_lower: float
    ci_upper: float
    battles: int
    wins: int
    losses: int
    ties: int
    median: float = float("nan")  # median of the bootstrap ratings (for Elo: less order-dependent)

    @property
    def win_rate(self) -> float:
        """(wins + ties / 2) / battles."""
        return (self.wins + 0.5 * self.ties) / self.battles if self.battles else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "model": self.model, "rating": self.rating, "ci": [self.ci_lower, self.ci_upper],
                "bootstrap_median": self.median,
                "battles": self.battles, "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "win_rate": self.win_rate}


@dataclass
class Leaderboard:
    """Models ranked by rating, with 95% bootstrap intervals and battle counts."""

    method: str
    rows: list[LeaderboardRow]
    num_battles: int
    bootstrap_rounds: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_battles": self.num_battles, "bootstrap_rounds": self.bootstrap_rounds,
                "seed": self.seed, "models": [row.to_dict() for row in self.rows]}

    def to_markdown(self) -> str:
        lines = [f"| rank | model | rating ({self.method}) | 95% CI | battles | win rate |",
                 "|---:|---|---:|---|---:|---:|"]
        for r in self.rows:
            ci = f"{r.ci_lower:.0f} – {r.ci_upper:.0f}" if math.isfinite(r.ci_lower) else "n/a"
            lines.append(f"| {r.rank} | {r.model} | {r.rating:.1f} | {ci} | {r.battles} | {r.win_rate:.1%} |")
        return "\n".join(lines) + "\n"


def _records(battles: Sequence[Battle]) -> dict[str, list[int]]:
    """model -> [battles, wins, losses, ties]."""
    counts: dict[str, list[int]] = {}
    for b in battles:
        for name, score in ((b.model_a, b.score_a), (b.model_b, 1.0 - b.score_a)):
            row = counts.setdefault(name, [0, 0, 0, 0])
            row[0] += 1
            row[1 if score == 1.0 else 2 if score == 0.0 else 3] += 1
    return counts


def leaderboard(battles: Iterable[Battle | Mapping[str, Any]], method: Method = "bt", rounds: int = 200,
                seed: int = 0, **kwargs: Any) -> Leaderboard:
    """Rate `battles`, bootstrap the intervals, and rank (highest rating first; ties by name)."""
    battles = as_battles(battles)
    if not battles:
        raise ConfigError("no battles to rate: the leaderboard needs at least one judged battle")
    ratings = fit_ratings(battles, method, **kwargs)
    samples = bootstrap_ratings(battles, method, rounds, seed, **kwargs) if rounds else \
        {name: np.full(1, np.nan) for name in ratings}
    intervals = confidence_intervals(samples)
    medians = {name: float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan") for name, v in samples.items()}
    counts = _records(battles)
    order = sorted(ratings, key=lambda name: (-ratings[name], name))
    rows = [LeaderboardRow(i + 1, name, ratings[name], *intervals[name], *counts[name], median=medians[name])
            for i, name in enumerate(order)]
    return Leaderboard(method, rows, len(battles), rounds, seed)
