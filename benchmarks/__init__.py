"""``pemma bench``: the PEMMA experiment table on real PET/CT (IBSI), speed and memory.

- :mod:`benchmarks.cli`: the command (options, ``--report-only``).
- :mod:`benchmarks.config`: step budgets and :class:`~benchmarks.config.BenchConfig`.
- :mod:`benchmarks.runner`: the run, phase by phase, writing ``bench.json``.
- :mod:`benchmarks.sites`: the bench's site YAMLs and manifests, case checks, alignment audit.
- :mod:`benchmarks.rows`: the CT backbone, the centralized rows and the CNN row.
- :mod:`benchmarks.federated`: the federated row (the project's Flower apps).
- :mod:`benchmarks.measure`: a model's training step, timed and profiled; size and upload.
- :mod:`benchmarks.speed`, :mod:`benchmarks.speed_worker`: PEMMA vs full fine-tuning in fresh
  processes, profiles, threads, inference; :mod:`benchmarks.loading`: data loading.
- :mod:`benchmarks.result_json`: ``bench.json`` (write, read, rows).
- :mod:`benchmarks.targets`, :mod:`benchmarks.plots`, :mod:`benchmarks.report` (+ ``report_*``):
  targets, plots and ``BENCHMARKS.md``.

The results behind the project's ``BENCHMARKS.md`` are in ``benchmarks/results/``.
"""
