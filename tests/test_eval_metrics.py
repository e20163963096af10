"""Reconstruction and sparsity metrics against independent numpy / sklearn computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import r2_score
from sklearn.metrics.pairwise import cosine_similarity

from medsae.eval import metrics as M


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) * rng.uniform(0.2, 3, size=16) + rng.normal(size=16) * 2
    x_hat = x + rng.normal(size=x.shape) * 0.5
    return x, x_hat


def test_mse_and_cosine(pair):
    x, x_hat = pair
    assert M.mse(x, x_hat) == pytest.approx(((x - x_hat) ** 2).sum() / x.size, rel=1e-12)
    direct = np.diag(cosine_similarity(x, x_hat))
    assert M.cosine_similarity_mean(x, x_hat) == pytest.approx(direct.mean(), rel=1e-10)
    x0 = x.copy()
    x0[3] = 0  # zero vector -> cosine 0
    assert M.cosine_similarities(x0, x_hat)[3] == 0.0


def test_fvu_is_variance_weighted_r2(pair):
    x, x_hat = pair
    # sklearn's variance-weighted R² = 1 - Σ_j SSE_j / Σ_j SST_j (per-dimension means)
    expected = 1 - r2_score(x, x_hat, multioutput="variance_weighted")
    assert M.fvu(x, x_hat) == pytest.approx(expected, rel=1e-10)
    assert M.variance_explained(x, x_hat) == pytest.approx(1 - expected, rel=1e-10)
    assert M.fvu(x, x) == 0.0
    assert M.fvu(x, np.broadcast_to(x.mean(axis=0), x.shape)) == pytest.approx(1.0)


def test_r2_scalar_mean_is_r2_of_flattened_block(pair):
    x, x_hat = pair
    assert M.r2_scalar_mean(x, x_hat) == pytest.approx(r2_score(x.ravel(), x_hat.ravel()), rel=1e-10)


def test_study_r2_weights_batches_by_size(pair):
    x, x_hat = pair
    batch = 128  # 300 rows -> batches of 128, 128, 44
    values = [r2_score(x[s : s + batch].ravel(), x_hat[s : s + batch].ravel()) for s in (0, 128, 256)]
    expected = np.average(values, weights=[128, 128, 44])
    assert M.r2_scalar_mean_study(x, x_hat, batch=batch) == pytest.approx(expected, rel=1e-10)


def test_scalar_mean_r2_and_fvu_differ_where_they_should():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(2048, 32)) * 0.1
    # dimensions with very different means: the scalar mean leaves their offsets in the denominator
    offsets = rng.normal(size=32) * 5
    x = rng.normal(size=(2048, 32)) + offsets
    x_hat = x + noise * 12  # error variance 1.44 > per-dimension variance 1
    r2_study = M.r2_scalar_mean_study(x, x_hat)
    ve = M.variance_explained(x, x_hat)
    assert r2_study > 0.9 and ve < 0.0  # the study calls it excellent, it is worse than the mean
    # zero-mean isotropic data: per-dimension means ~ the scalar mean, the two agree
    z = rng.normal(size=(2048, 32))
    z_hat = z + noise
    assert M.r2_scalar_mean_study(z, z_hat) == pytest.approx(M.variance_explained(z, z_hat), abs=0.01)
    # never smaller than 1 - FVU on the same block
    for _ in range(5):
        a = rng.normal(size=(64, 8)) + rng.normal(size=8)
        b = a + rng.normal(size=a.shape)
        assert M.r2_scalar_mean(a, b) >= M.variance_explained(a, b) - 1e-12


def test_streaming_stats_equal_whole_array(pair):
    x, x_hat = pair
    stats = M.ReconstructionStats(batch=64)
    for start in (0, 128, 256):  # chunks of 128, 128, 44 rows
        stats.update(x[start : start + 128], x_hat[start : start + 128])
    got = stats.result()
    assert got["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-10)
    assert got["r2_scalar_mean_study"] == pytest.approx(M.r2_scalar_mean_study(x, x_hat, batch=64), rel=1e-10)
    assert got["mse"] == pytest.approx(M.mse(x, x_hat), rel=1e-10)
    assert got["cosine_sim"] == pytest.approx(M.cosine_similarity_mean(x, x_hat), rel=1e-10)
    bad = M.ReconstructionStats(batch=64)
    bad.update(x[:50], x_hat[:50])
    with pytest.raises(ValueError):
        bad.update(x[50:], x_hat[50:])


@pytest.fixture
def codes():
    rng = np.random.default_rng(2)
    dense = rng.random((500, 40)) * (rng.random((500, 40)) < rng.uniform(0, 0.3, size=40))
    dense[:, 5] = 0  # dead
    dense[:, 7] = rng.random(500) + 0.1  # fires everywhere
    dense[:300, 9] = 0  # dead in the first batches only
    csr = sp.csr_matrix(dense)
    # an explicitly stored zero must not count as firing
    indptr = csr.indptr.copy()
    indptr[-1] += 1  # appended to the last row, column 5 (all zero)
    csr = sp.csr_matrix((np.append(csr.data, 0.0), np.append(csr.indices, 5), indptr), shape=csr.shape)
    assert csr.nnz == (dense != 0).sum() + 1
    return dense, csr


def test_l0_and_its_distribution(codes):
    dense, csr = codes
    expected = (np.abs(dense) > 1e-8).sum(axis=1)
    l0 = M.l0_per_sample(csr)
    np.testing.assert_array_equal(l0, expected)
    summary = M.l0_summary(l0)
    assert summary["l0_mean"] == pytest.approx(expected.mean())
    assert summary["l0_p50"] == pytest.approx(np.percentile(expected, 50))
    assert summary["l0_p90"] == pytest.approx(np.percentile(expected, 90))
    assert summary["l0_max"] == expected.max()


def test_dead_and_dense_fractions(codes):
    dense, csr = codes
    fires = (np.abs(dense) > 1e-8).sum(axis=0)
    counts = M.latent_fire_counts(csr)
    np.testing.assert_array_equal(counts, fires)
    assert M.dead_fraction(counts) == pytest.approx(np.mean(fires == 0))
    assert M.dead_fraction(counts) >= 1 / 40  # latent 5
    assert M.dense_fraction(counts, 500) == pytest.approx(np.mean(fires / 500 > 0.1))


def test_study_alive_count_is_per_batch(codes):
    dense, csr = codes
    batch = 128
    alive, sizes = [], []
    for start in range(0, 500, batch):
        block = dense[start : start + batch]
        alive.append((block.max(axis=0) > 1e-8).sum())
        sizes.append(len(block))
    expected = np.average(alive, weights=sizes)
    assert M.alive_per_batch_study(csr, batch=batch) == pytest.approx(expected)
    # a latent dead in some batches lowers the per-batch count but not the dataset-level dead count
    assert M.alive_per_batch_study(csr, batch=batch) < 40 - M.dead_fraction(M.latent_fire_counts(csr)) * 40
