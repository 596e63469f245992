"""Training code that hpo can optimise.

``REGISTRY`` maps the names used in study files (``objective: digits_mlp``) to
``module:attribute`` paths of :class:`hpo.objective.Objective` instances. Study files may also name
any importable ``package.module:attribute`` directly.
"""

from types import MappingProxyType

REGISTRY = MappingProxyType(
    {
        "digits_mlp": "objectives.digits:DIGITS_MLP",
        "image_classifier": "objectives.vision.train:IMAGE_CLASSIFIER",
    }
)
