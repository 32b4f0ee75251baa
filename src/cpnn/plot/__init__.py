"""Figures: cell-type weight maps, gene maps, report plots (matplotlib, Agg backend)."""
from cpnn.plot.maps import driver_shares, plot_prediction, read_prediction, top_spread_genes

__all__ = ["driver_shares", "plot_prediction", "read_prediction", "top_spread_genes"]
