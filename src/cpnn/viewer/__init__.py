"""``cpnn view``: predictions over a deep-zoom H&E in a self-contained offline HTML page.

Heavy parts (OpenSlide, anndata, matplotlib colour tables) are imported when a viewer is
written, never at ``import cpnn``.
"""
from .page import OPENSEADRAGON_VERSION, resources_dir, write_viewer

__all__ = ["OPENSEADRAGON_VERSION", "resources_dir", "write_viewer"]
