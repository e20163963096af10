"""Feeding the embed stage: slices rendered by worker processes, ahead of the forward pass.

One item = the rendered images of one work item (one scan's rows within one shard; a long scan at a
large input size is cut at :data:`MAX_ITEM_PIXELS`), so a worker reads a volume once per item. Items
come back in order (the runner batches rows in ``slice_id`` order, across items, so where items are
cut changes no byte).
On CUDA the DataLoader's pin-memory thread copies each item into page-locked memory, so the
runner's ``.to(device, non_blocking=True)`` returns at once and the copy queues behind the running
forward pass; the main process only launches kernels while the workers render the next items.
Images travel as uint8 (a quarter of float32's bytes); preprocessing happens on the device.

How many workers (``embed.num_workers``):

* a number: that many, at most the CPUs this process may use (:func:`medsae.threads.worker_count`);
* ``auto`` on an accelerator: every CPU but one (the main process's, which feeds the device), at most
  :data:`MAX_AUTO_WORKERS`;
* ``auto`` on the CPU: the model's forward needs the cores itself, so below :data:`CPU_WORKER_MIN_CPUS`
  CPUs slices are rendered in-process (0 workers), else one worker renders beside the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medsae.errors import MedsaeError
from medsae.threads import available_cpus, requested_threads, worker_count

#: ``render(slices_dir, slice_ids) -> iterator of (slice_ids, uint8 [n, H, W])``, one scan at a time
RenderFn = Callable[[Path, np.ndarray], Iterable[tuple[np.ndarray, np.ndarray]]]

#: most workers ``auto`` starts: each holds up to PREFETCH items (MAX_ITEM_PIXELS at most) in shared memory
MAX_AUTO_WORKERS = 16
#: items each worker renders ahead of the consumer
PREFETCH = 2
#: CPUs from which ``auto`` starts a render worker beside a model running on the CPU
CPU_WORKER_MIN_CPUS = 4
#: pixels of one item at most (64 MiB of uint8): a long scan at 1024 px is cut into items of 64 rows, so
#: workers x PREFETCH items in shared and pinned memory stay bounded (each cut re-reads the volume)
MAX_ITEM_PIXELS = 2**26


def loader_workers(requested: int | str, device: torch.device) -> int:
    """Worker processes for ``embed.num_workers`` = ``requested`` (a count or ``auto``) on ``device``."""
    if requested != "auto":
        return worker_count(int(requested)) if int(requested) else 0
    cpus = requested_threads() or available_cpus()
    if device.type == "cpu":
        return 1 if cpus >= CPU_WORKER_MIN_CPUS else 0
    return max(1, min(cpus - 1, MAX_AUTO_WORKERS))


def item_rows(input_size: int, batch_size: int) -> int:
    """Rows per loader item at most: :data:`MAX_ITEM_PIXELS` of ``input_size``-px images, at least a batch."""
    return max(batch_size, MAX_ITEM_PIXELS // (input_size * input_size))


def split_items(items: list[tuple[int, int]], max_rows: int) -> list[tuple[int, int]]:
    """``items`` with every range longer than ``max_rows`` cut into consecutive pieces of at most that many."""
    return [(a, min(a + max_rows, stop)) for start, stop in items for a in range(start, stop, max_rows)]


class ScanItems(Dataset):
    """Item i = (first row, uint8 images) of work item i (one scan's rows within one shard)."""

    def __init__(self, slices_dir: Path, slice_ids: np.ndarray, items: list[tuple[int, int]], render: RenderFn):
        self.slices_dir = slices_dir
        self.slice_ids = slice_ids
        self.items = items
        self.render = render

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        start, stop = self.items[i]
        ids = self.slice_ids[start:stop]
        return start, torch.from_numpy(render_rows(self.render, self.slices_dir, ids))


def render_rows(render: RenderFn, slices_dir: Path, ids: np.ndarray) -> np.ndarray:
    """The images of ``ids`` in that order, whatever order the renderer yields them in."""
    got_ids, got_imgs = [], []
    for part_ids, part_imgs in render(slices_dir, ids):
        got_ids.append(np.asarray(part_ids, dtype=np.int64))
        got_imgs.append(np.asarray(part_imgs))
    if not got_ids:
        raise MedsaeError(f"embed: the renderer returned no images for slices {ids[:3].tolist()}... of {slices_dir}")
    all_ids = np.concatenate(got_ids)
    images = got_imgs[0] if len(got_imgs) == 1 else np.concatenate(got_imgs)
    if np.array_equal(all_ids, ids):
        return np.ascontiguousarray(images)
    perm = np.argsort(all_ids, kind="stable")
    loc = np.searchsorted(all_ids[perm], ids).clip(0, len(all_ids) - 1)
    if not np.array_equal(all_ids[perm][loc], ids):
        raise MedsaeError(f"embed: the renderer did not return every requested slice of {slices_dir}")
    return np.ascontiguousarray(images[perm[loc]])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers render; the main process owns the cores for the model


def make_loader(
    slices_dir: Path,
    slice_ids: np.ndarray,
    items: list[tuple[int, int]],
    render: RenderFn,
    num_workers: int,
    device: torch.device,
    max_rows: int | None = None,
) -> DataLoader:
    """Items in order (cut at ``max_rows``), rendered by ``num_workers`` processes (0: in this one), pinned
    when feeding CUDA. Where items are cut changes no byte: the runner batches rows across items."""
    if max_rows is not None:
        items = split_items(items, max_rows)
    return DataLoader(
        ScanItems(slices_dir, slice_ids, items, render),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=PREFETCH if num_workers else None,
    )  # in order: a map-style dataset's items come back in index order whatever the worker count
