"""One conversion shared by the stages: a scipy CSR matrix as a torch sparse CSR tensor."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp


def torch_csr(csr: sp.csr_matrix, device: str = "cpu") -> Any:
    """``csr`` as a float32 torch sparse CSR tensor on ``device`` (products cost nnz x d, not n x d_sae x d)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data.astype(np.float32)),
            size=csr.shape,
            check_invariants=False,
        ).to(device)
