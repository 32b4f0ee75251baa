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
]
