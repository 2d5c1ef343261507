"""A synthetic PET/CT federation: small limb phantoms with tumours, survival and EHR.

- :mod:`pemma_core.phantoms.physics`: one case's anatomy, scanners, images and survival model.
- :mod:`pemma_core.phantoms.writer`: a federation on disk (NIfTI, manifests, clinical CSVs, YAMLs).
- :mod:`pemma_core.phantoms.coordination`: one federation shared by nodes starting together.
- :mod:`pemma_core.phantoms.cli`: ``pemma phantoms``.
"""
