"""pemma Flower ServerApp (server_app.py) and its strategy (strategy.py): validated, modality-aware aggregation."""
