"""pemma_core: the framework-free PEMMA library (models, adapters, data, training,
metrics, aggregation maths). Never imports flwr."""

__version__ = "0.1.0"
