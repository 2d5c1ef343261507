"""pemma Flower ServerApp (server_app.py), its phases (phases.py) and strategy (strategy.py), the run folder (run_dir.py) and its report (report.py)."""
