"""Whole federations on one machine (simulation engine, demos, benchmarks)."""
