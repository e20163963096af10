"""medsae.data: TotalSegmentator volumes -> an index of 2-D slices with structure areas.

Modules, in data-flow order:

* ``totalsegmentator`` — layout reader (meta.csv, volumes, masks), ``ensure_dataset``, ``dataset_manifest``;
* ``phantom`` — a synthetic dataset in the same layout (the offline ground truth);
* ``volume`` / ``slicing`` / ``intensity`` — the slicing grid, crops, display orientation, windows;
* ``ingest`` (one volume) and ``build`` (the process pool, resumable parts, the index files);
* ``splits`` — train/val/test per scan, stored once per dataset; ``anatomy`` — structure regions;
* ``index`` and ``render`` — the read API used by every later stage; ``stage`` — ``run_slices``.
"""
