"""Predictions out to the tools people already use: QuPath (GeoJSON detections) and
SpatialData (zarr stores that napari-spatialdata opens). Both place spots and tiles in the
full-resolution pixels of the image the prediction was made on (see :mod:`.source`).

``geojson`` needs nothing beyond the core; ``spatialdata`` needs the extra
``pip install 'cpnn[spatialdata]'`` and imports it only when called.
"""
from .geojson import prediction_geojson, write_geojson
from .source import ImageSource, prediction_image

__all__ = ["ImageSource", "prediction_image", "prediction_geojson", "write_geojson"]
