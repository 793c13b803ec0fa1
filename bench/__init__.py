"""Benchmarks and studies of regproxy, each a module run from the repository root as ``python -m bench.NAME``.

* ``run``: speed, memory and precision against the linear baseline and peer models (docs/benchmarks.md);
  ``report`` rebuilds that page from docs/benchmarks.json; ``folder_throughput`` times ``regproxy predict`` on a
  folder; ``peers`` builds the peer models;
* ``quality``, ``thin_objects``, ``camvid``, ``plugins``: the quality studies at equal budget (docs/studies.md);
* ``gpu_check``: what the CPU test suite cannot check, on a CUDA machine (docs/gpu.md).

They measure the library through its own pieces: models from :mod:`regproxy_cli`, scores from
:func:`regproxy_cli.engine.evaluate.evaluate`, the CPU's description and device synchronisation from the inference
runtime. ``common`` holds what the scripts share.
"""
