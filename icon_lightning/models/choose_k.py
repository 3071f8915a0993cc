"""K without labels (``--data.num_clusters auto``): the judge's choice among the clusterings the run's heads start
from, at every K of a range (``data.num_clusters.default_range``: 2 to min(50, N // 20), stated a priori;
``--data.num_clusters_range [lo, hi]`` overrides it).

The rule is the judge's (``metrics.judge``: the cosine silhouette of a hard assignment in the prepared features, on
its seeded subsample of at most 4,096 rows), applied across K: the chosen K is the one whose better start scores
highest (ties: the smaller K). Nothing here reads labels.

The stated approximation (``APPROXIMATION``, also in the record): the candidates at each K are the two clusterings
heads start from (``models.parts.HEAD_INITS``: k-means, and spectral clustering of the 10-NN graph), computed on the
judge's subsample rows only (``judge_rows``: all rows up to 4,096, else a draw with seed 0) and scored by the judge
on those rows. The spectral embedding of the subsample's 10-NN graph (``classical.spectral.knn_affinity``, as
``KNNSpectralClustering`` builds it) is computed once with K_max components, and each K runs k-means on its first K
columns: spectral clustering at K up to the eigensolver (scikit-learn's ``SpectralClustering`` embeds with K
components, whose span is the first K of K_max). K is searched coarse to fine: a grid over the range (every integer
while small, then steps of about ×1.25), then every integer between the best grid point's neighbours. The fit at
the chosen K then starts and trains its heads as any run does, on all rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from icon_lightning.classical.spectral import knn_affinity
from icon_lightning.metrics.judge import Judge
from icon_lightning.models.parts import HEAD_INITS, SPECTRAL_LOBPCG_ROWS

STARTS = ("kmeans", "spectral")  # the clusterings the run's heads start from
GRID_STEP = 1.25  # the coarse grid's ratio between neighbouring K
SPECTRAL_NEIGHBOURS = 10  # the k-NN graph spectral starts embed (``parts._spectral``'s)
APPROXIMATION = (
    "candidates at each K: k-means and spectral clustering (10-NN graph) of the judge's subsample rows (at most "
    "4,096, seed 0), scored there by the judge; one spectral embedding with K_max components, each K clustering its "
    "first K columns; K searched coarse (about x1.25 steps) to fine (every K between the best grid point's "
    "neighbours)"
)


@dataclass(frozen=True)
class KSearch:
    """What a K search did: the ``range`` (lo, hi), ``scores`` {K: {start: judge score, ..., "best": the
    highest}} for every K tried, the ``chosen`` K, its ``wall_time_s``, the ``rows`` it clustered and judged, and
    the stated ``approximation``."""

    range: tuple[int, int]
    scores: dict[int, dict[str, float]]
    chosen: int
    wall_time_s: float
    rows: int
    approximation: str = field(default=APPROXIMATION)

    def record(self) -> dict:
        """JSON-ready (``metrics.json``'s ``num_clusters_search``): K as string keys, in increasing K."""
        scores = {str(k): {name: round(v, 6) for name, v in self.scores[k].items()} for k in sorted(self.scores)}
        return {"range": list(self.range), "scores": scores, "chosen": self.chosen,
                "wall_time_s": round(self.wall_time_s, 2), "rows": self.rows,
                "approximation": self.approximation}  # fmt: skip


def coarse_grid(lo: int, hi: int, step: float = GRID_STEP) -> list[int]:
    """lo, then each next K = max(K + 1, round(K × step)) below hi, then hi: every integer while K × (step − 1) <
    1.5, about ×``step`` after."""
    grid, k = [], lo
    while k < hi:
        grid.append(k)
        k = max(k + 1, round(k * step))
    return [*grid, hi]


def fine_grid(grid: list[int], best: int) -> list[int]:
    """The integers between ``best``'s neighbours on ``grid`` that the grid lacks."""
    i = grid.index(best)
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return [k for k in range(left, right + 1) if k not in grid]


def chosen_k(scores: dict[int, dict[str, float]]) -> int:
    """The K whose best start scores highest; among equal scores the smaller K."""
    best = max(v["best"] for v in scores.values())
    return min(k for k, v in scores.items() if v["best"] == best)


class Starts:
    """The heads' two starts at any K on the same rows ``x`` (S, D): ``kmeans`` (``HEAD_INITS["kmeans"]``) and
    ``spectral``: k-means (10 restarts, as scikit-learn's ``SpectralClustering``) of the first K columns of the
    rows' spectral embedding, computed once with ``k_max`` components."""

    def __init__(self, x: np.ndarray, k_max: int, seed: int = 0) -> None:
        from sklearn.manifold import spectral_embedding

        self.x, self.seed = np.ascontiguousarray(x, dtype=np.float32), seed
        affinity = knn_affinity(self.x, SPECTRAL_NEIGHBOURS)
        solver = "lobpcg" if len(self.x) > SPECTRAL_LOBPCG_ROWS else None  # the heads' spectral start's rule
        self.maps = spectral_embedding(
            affinity, n_components=k_max, eigen_solver=solver, random_state=seed, drop_first=False
        )

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        """{start: (S,) assignment} at K = ``k``."""
        from sklearn.cluster import k_means

        spectral = k_means(self.maps[:, :k], k, random_state=self.seed, n_init=10)[1]
        return {"kmeans": np.asarray(HEAD_INITS["kmeans"](self.x, k, self.seed)), "spectral": spectral}


def search_num_clusters(features: np.ndarray, k_range: tuple[int, int], seed: int = 0) -> KSearch:
    """The judge's K in ``k_range`` (lo, hi) for the prepared features (N, D) (module doc): coarse grid, then the
    integers around its best point. ``seed``: the starts' (k-means, the spectral embedding)."""
    started = time.perf_counter()
    lo, hi = k_range
    judge = Judge(features)
    starts = Starts(judge.features.numpy(), hi, seed)
    scores: dict[int, dict[str, float]] = {}

    def score(ks: list[int]) -> None:
        for k in ks:
            found = {name: judge.score(assignment) for name, assignment in starts(k).items()}
            scores[k] = {**found, "best": max(found.values())}

    grid = coarse_grid(lo, hi)
    score(grid)
    score(fine_grid(grid, chosen_k(scores)))
    return KSearch((lo, hi), scores, chosen_k(scores), time.perf_counter() - started, len(judge.rows))


def plot_search(record: dict, path) -> None:
    """The search's curve (``KSearch.record()``): each start's judge score against K, the chosen K marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in record["scores"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in STARTS:
        ax.plot(ks, [record["scores"][str(k)][name] for k in ks], "o-", ms=3, label=name)
    ax.axvline(record["chosen"], color="k", ls="--", lw=1, label=f"chosen K = {record['chosen']}")
    ax.set_xlabel("K")
    ax.set_ylabel("judge (cosine silhouette)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
