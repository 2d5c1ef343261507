"""The models pemma trains and the files they live in.

* :mod:`~pemma_core.model.spec`: ``ModelSpec`` (what a model is, and its one JSON
  encoding), the backbone/adapter/kind/group constants, ``build_backbone``.
* :mod:`~pemma_core.model.monai_speed`: faster, numerically equivalent MONAI modules.
* :mod:`~pemma_core.model.layers`: PEMMA's trainable layers, each declaring its parameter group.
* :mod:`~pemma_core.model.pemma`: ``SegmentationModel`` (the base), ``PemmaModel``, ``MODE_GROUPS``.
* :mod:`~pemma_core.model.baselines`: the fully trained baselines (``FullModel``, ``CnnModel``).
* :mod:`~pemma_core.model.factory`: ``build_model`` (every kind) and ``count_parameters``.
* :mod:`~pemma_core.model.files`: backbone fingerprint, trainable state, adapter and backbone files.
* :mod:`~pemma_core.model.info`: the ``pemma info`` command.
"""
