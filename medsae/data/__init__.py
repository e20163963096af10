"""medsae.data: medical images -> an index of 2-D slices with structure areas.

Modules, in data-flow order:

* ``config`` — the ``data:`` section (format, orientation, slicing rules; ``preset: study``);
* sources (``sources`` dispatches on ``data.format``), each giving a ``scans.SourceScans``:
  ``totalsegmentator`` (layout reader, ``ensure_dataset``, ``dataset_manifest``), ``manifest`` (a table
  of images), ``dicom_folder`` (every DICOM series under a folder); ``check`` is the dry run over them;
* ``phantom`` — a synthetic dataset in the TotalSegmentator layout (the offline ground truth);
* readers: ``readers`` (one entry point), ``volume`` (NIfTI, the slicing grid), ``dicom`` (series
  assembly and pixels), ``images2d`` (PNG/JPEG/TIFF), ``labelmap`` (label tables, areas from one map);
* ``slicing`` / ``orientation`` / ``intensity`` — crops, display orientation, windows;
* ``ingest`` (one scan) and ``build`` (the process pool, resumable parts, the index files);
* ``splits`` — train/val/test per scan or subject, stored once per dataset; ``pseudonym`` — keyed
  hashes of patient identifiers; ``anatomy`` — structure regions;
* ``index`` and ``render`` — the read API used by every later stage; ``stage`` — ``run_slices``.
"""
