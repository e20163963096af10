"""The study's "diverse top-activating samples" of a latent on one split (docs/method.md#interpret-study-protocol).

1. Candidates: the split's slices by descending activation of the latent, the first slice of each
   image, until ``N_CANDIDATES`` = 20 images. The walk does not stop at zero: a latent firing on fewer
   than 20 images gets non-firing slices as candidates, as in the study. Rows are in the study's table
   order and tied activations go to the later row first (the study's ``argsort(...)[::-1]``, made stable).
2. Greedy max-min diversity over the candidates' full sparse codes: start with the top candidate, then
   repeatedly add the candidate whose smallest cosine dissimilarity (1 - cosine; a zero vector has
   cosine 0 with everything) to those already chosen is largest (the first one on a tie), up to
   ``N_SAMPLES`` = 5. With fewer candidates all are taken (the study stopped with an error).

Images are keyed by ``image_id`` alone, as the study keyed them (CT and MRI reuse ids).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

N_CANDIDATES = 20
N_SAMPLES = 5


def candidate_rows(column: sp.spmatrix, image: np.ndarray, n_candidates: int = N_CANDIDATES) -> np.ndarray:
    """Rows of the first slice per image in descending activation, at most ``n_candidates``.

    ``column``: the latent's activations over the split's rows ``[n, 1]`` (sparse); ``image``: an integer
    image code per row.
    """
    col = sp.csc_matrix(column)
    n = col.shape[0]
    rows, values = col.indices.astype(np.int64), col.data.astype(np.float64)
    positive = values > 0
    rows, values = rows[positive], values[positive]
    order = np.lexsort((-rows, -values))  # descending activation, ties: later row first
    walk = rows[order]
    _, first = np.unique(image[walk], return_index=True)
    chosen = walk[np.sort(first)][:n_candidates]
    if len(chosen) < n_candidates:  # the rest of the walk: non-firing slices, later rows first
        seen = np.zeros(int(image.max()) + 1 if n else 0, dtype=bool)
        seen[image[rows]] = True
        reverse = np.arange(n - 1, -1, -1, dtype=np.int64)
        reverse = reverse[~seen[image[reverse]]]
        _, first = np.unique(image[reverse], return_index=True)
        more = reverse[np.sort(first)][: n_candidates - len(chosen)]
        chosen = np.concatenate([chosen, more])
    return chosen.astype(np.int64)


def diverse_pick(vectors: np.ndarray, n_samples: int = N_SAMPLES) -> list[int]:
    """Greedy max-min cosine dissimilarity over the rows of ``vectors``, starting with row 0."""
    v = np.asarray(vectors, dtype=np.float64)
    if len(v) == 0:
        return []
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    dissimilarity = 1.0 - unit @ unit.T
    chosen = [0]
    while len(chosen) < min(n_samples, len(v)):
        best, best_value = -1, -np.inf
        for i in range(len(v)):
            if i in chosen:
                continue
            value = dissimilarity[i, chosen].min()
            if value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return chosen


def diverse_samples(
    codes: sp.csr_matrix,
    codes_csc: sp.csc_matrix,
    image: np.ndarray,
    latent: int,
    n_candidates: int = N_CANDIDATES,
    n_samples: int = N_SAMPLES,
) -> np.ndarray:
    """Rows (of the split's code matrix, in the study's order) of the latent's diverse top samples.

    ``codes`` and ``codes_csc`` hold the same matrix (rows: the split's slices in the study's order);
    ``image``: an integer image code per row.
    """
    candidates = candidate_rows(codes_csc[:, [int(latent)]], image, n_candidates)
    picked = diverse_pick(codes[candidates].toarray(), n_samples)
    return candidates[picked]
