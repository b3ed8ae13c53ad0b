"""Figures, tables and reports drawn from runs' results.json (installed as sparsebench.experiments)."""
