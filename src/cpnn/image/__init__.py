"""Pixels: slide access, spot patches, tissue detection and whole-slide tiling.

All coordinates are (x, y) in level-0 (full-resolution) pixels; sizes are given in
microns and converted with the slide's microns per pixel.
"""
from cpnn.image.patches import read_patch, spot_patches, validate_centers
from cpnn.image.slide import (
    ArraySlide,
    OpenSlideSlide,
    PILSlide,
    Slide,
    TiffSlide,
    open_slide,
    validate_mpp,
)
from cpnn.image.tiling import iter_tiles, tile_grid, tile_size_level0, tissue_fraction
from cpnn.image.tissue import otsu_threshold, rgb_to_hsv, tissue_mask

__all__ = [
    "Slide",
    "OpenSlideSlide",
    "TiffSlide",
    "PILSlide",
    "ArraySlide",
    "open_slide",
    "validate_mpp",
    "read_patch",
    "spot_patches",
    "validate_centers",
    "tissue_mask",
    "otsu_threshold",
    "rgb_to_hsv",
    "tile_grid",
    "iter_tiles",
    "tile_size_level0",
    "tissue_fraction",
]
