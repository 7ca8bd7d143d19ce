"""The boundary F-measure at the optimal dataset scale (odsF) of the BSDS protocol, with one-to-one matching.

Martin, Fowlkes and Malik, "Learning to Detect Natural Image Boundaries Using Local Brightness, Color, and
Texture Cues" (TPAMI 2004), as the BSDS benchmark and the seism toolbox (Pont-Tuset and Marques, CVPR 2013)
score edges; the MTL survey (Vandenhende et al., TPAMI 2021) reports it for NYUD and PASCAL-Context edges
with a match tolerance of 0.0075 of the image diagonal.

For each threshold ``t`` of ``thresholds`` (BSDS: 99 evenly spaced in (0, 1)) and each image:

- the predicted edge pixels are the labelled pixels whose edge probability is ``>= t``; the true edge pixels
  are those labelled 1 (pixels at ``ignore_index`` are in neither set);
- a predicted pixel and a true pixel may be matched when their Euclidean distance is at most ``tolerance``
  times the image diagonal; each pixel is matched at most once, and the number of matches is the largest a
  one-to-one assignment achieves (a maximum-cardinality bipartite matching, Hopcroft-Karp through scipy).

Over the split, per threshold: P = matches / predicted pixels, R = matches / true pixels (0 where the
denominator is 0, as BSDS does), F = 2PR / (P + R) (0 when P + R = 0); ``odsF`` is the largest F over the
thresholds. Two simplifications against the MATLAB benchmark: the thresholded prediction is not thinned
(BSDS thins it with ``bwmorph(..., 'thin')``; a network trained with the weighted BCE predicts thick ridges,
which lowers precision), and the best F is taken over the thresholds without BSDS's interpolation between
neighbouring thresholds. The BSDS matcher (``correspondPixels``) minimises distance among the maximum
matchings; only the match count enters P and R, so the maximum matching gives the same counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from torch import Tensor
from torchmetrics import Metric


def bsds_thresholds(count: int) -> np.ndarray:
    """``count`` thresholds evenly spaced strictly inside (0, 1), as the BSDS benchmark's ``nthresh``."""
    return np.linspace(1.0 / (count + 1), 1.0 - 1.0 / (count + 1), count)


def _graph(pred_rows: np.ndarray, pred_cols: np.ndarray, truth: np.ndarray, radius: float) -> csr_matrix:
    """The ``[P, G]`` biadjacency of predicted pixels (given by their coordinates) and the ``True`` pixels of
    ``truth`` (row-major order) that lie at most ``radius`` pixels apart."""
    height, width = truth.shape
    true_rows, true_cols = np.nonzero(truth)
    index = np.full((height, width), -1, dtype=np.int64)
    index[true_rows, true_cols] = np.arange(true_rows.size)
    reach = int(math.floor(radius))
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            rows, cols = pred_rows + dy, pred_cols + dx
            inside = np.flatnonzero((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width))
            partner = index[rows[inside], cols[inside]]
            hit = partner >= 0
            left.append(inside[hit])
            right.append(partner[hit])
    rows_all, cols_all = np.concatenate(left), np.concatenate(right)
    return csr_matrix(
        (np.ones(rows_all.size, dtype=np.int8), (rows_all, cols_all)), shape=(pred_rows.size, true_rows.size)
    )


def _matching_size(graph: csr_matrix) -> int:
    if graph.shape[0] == 0 or graph.shape[1] == 0 or graph.nnz == 0:
        return 0
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def match_count(predicted: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """The size of a maximum one-to-one matching between the ``True`` pixels of two ``H x W`` boolean maps,
    a pair being allowed when the pixels lie at most ``radius`` pixels apart (Euclidean distance)."""
    rows, cols = np.nonzero(predicted)
    return _matching_size(_graph(rows, cols, truth, radius))


def boundary_counts(
    probability: np.ndarray, truth: np.ndarray, labelled: np.ndarray, thresholds: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per threshold, the matches and the predicted edge pixels of one image, and its true edge pixels.

    ``probability`` is the ``H x W`` edge probability, ``truth`` and ``labelled`` boolean maps; the match radius
    is ``tolerance`` times the image diagonal. The pixel graph is built once, at the lowest threshold; each
    threshold keeps the predicted pixels at or above it (pixels without a neighbour in reach cannot match).
    """
    radius = tolerance * math.hypot(*truth.shape)
    truth = truth & labelled
    scores = np.sort(probability[labelled])
    predicted = (scores.size - np.searchsorted(scores, thresholds, side="left")).astype(np.int64)
    if radius < 1.0:  # only a pixel itself is in reach: the matches are the true pixels predicted as edges
        hits = np.sort(probability[truth])
        matches = (hits.size - np.searchsorted(hits, thresholds, side="left")).astype(np.int64)
        return matches, predicted, int(hits.size)
    rows, cols = np.nonzero(labelled & (probability >= thresholds.min()))
    graph = _graph(rows, cols, truth, radius)
    linked = np.diff(graph.indptr) > 0
    values = probability[rows, cols]
    matches = np.zeros(len(thresholds), dtype=np.int64)
    previous: tuple[np.ndarray, int] | None = None
    for i, threshold in enumerate(thresholds):
        keep = np.flatnonzero(linked & (values >= threshold))
        if previous is not None and np.array_equal(keep, previous[0]):
            matches[i] = previous[1]
            continue
        matches[i] = _matching_size(graph[keep])
        previous = (keep, int(matches[i]))
    return matches, predicted, int(truth.sum())


def ods_f(matches: np.ndarray, predicted: np.ndarray, true_total: float) -> float:
    """The best F-measure over the thresholds from the split's summed counts (BSDS's zero conventions)."""
    precision = np.where(predicted > 0, matches / np.maximum(predicted, 1), 0.0)
    recall = matches / true_total if true_total > 0 else np.zeros_like(precision)
    total = precision + recall
    f = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)
    return float(f.max())


class BoundaryMetric(Metric):
    """odsF over a split (see the module docstring); the counts are summed over images and processes."""

    full_state_update = False
    matches: Tensor  # metric states (add_state)
    predicted: Tensor
    truth: Tensor
    images: Tensor

    def __init__(self, task: str, tolerance: float, thresholds: int, ignore_index: int) -> None:
        super().__init__()
        self.task = task
        self.tolerance = tolerance
        self.ignore_index = ignore_index
        self.levels = bsds_thresholds(thresholds)
        for state in ("matches", "predicted"):
            self.add_state(state, default=torch.zeros(thresholds, dtype=torch.float64), dist_reduce_fx="sum")
        for state in ("truth", "images"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor, valid: Tensor) -> None:
        keep = valid.to(device=target.device, dtype=torch.bool)
        probability = torch.sigmoid(prediction.detach()[keep].float())[:, 0].cpu().numpy()
        labels = target[keep].cpu().numpy()
        for prob, label in zip(probability, labels, strict=True):
            matches, predicted, truth = boundary_counts(
                prob, label == 1, label != self.ignore_index, self.levels, self.tolerance
            )
            self.matches += torch.from_numpy(matches).to(self.matches)
            self.predicted += torch.from_numpy(predicted).to(self.predicted)
            self.truth += truth
            self.images += 1

    def compute(self) -> dict[str, float]:
        if float(self.images) == 0:
            return {"odsF": float("nan")}
        return {"odsF": ods_f(self.matches.cpu().numpy(), self.predicted.cpu().numpy(), float(self.truth))}
