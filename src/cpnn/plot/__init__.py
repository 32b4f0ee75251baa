"""Figures: cell-type weight maps, gene maps, report plots (matplotlib, Agg backend)."""
