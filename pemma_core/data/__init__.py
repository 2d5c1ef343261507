"""A site's data: manifest, case checks, MONAI pipelines and loaders, inference I/O, clinical tables.

- :mod:`pemma_core.data.manifest`: the manifest CSV (read, write), cases and their problems.
- :mod:`pemma_core.data.checks`: every check of a case and of the clinical table; check cache.
- :mod:`pemma_core.data.pipeline`: usable cases, transforms, cached datasets, loaders.
- :mod:`pemma_core.data.inference_io`: one case in for a model, its mask out on the CT grid.
- :mod:`pemma_core.data.clinical`: the clinical CSV reader and the EHR preprocessor.
- :mod:`pemma_core.data.site_check`: ``pemma check-site``.
- :mod:`pemma_core.data.volumes`: any image source (NIfTI, checked for gzip integrity; a DICOM
  series; RTSTRUCT; DICOM-SEG) as one volume, and the per-case DICOM -> NIfTI cache.
- :mod:`pemma_core.data.dicom`: DICOM series, SUV conversion, RTSTRUCT and DICOM-SEG reading.
- :mod:`pemma_core.data.convert`: ``pemma convert``.
"""
