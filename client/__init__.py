"""pemma Flower ClientApp (client_app.py): one site; the work itself is in task.py, which calls pemma_core."""
