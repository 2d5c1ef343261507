"""Typed configuration: the run settings (:mod:`pemma_core.config.run`) and a site's YAML
(:mod:`pemma_core.config.site`), each defined once as a pydantic model."""
