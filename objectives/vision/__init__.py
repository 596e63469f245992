"""Vision objectives: image datasets from local folders, decoded once per worker.

The data layer is :mod:`objectives.vision.data`; see ``docs/datasets.md``.
"""

from objectives.vision.data import (
    CELEBA_ATTRIBUTES,
    DATA_ROOT_ENV,
    VOC_CLASSES,
    DataConfig,
    ImageData,
    load_image_data,
    resolve_root,
)

__all__ = [
    "CELEBA_ATTRIBUTES",
    "DATA_ROOT_ENV",
    "VOC_CLASSES",
    "DataConfig",
    "ImageData",
    "load_image_data",
    "resolve_root",
]
