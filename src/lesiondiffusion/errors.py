"""Project exception types.

Every error raised for bad user input is a ``LesionDiffusionError``; its message names the file, the
key, the offending value and the fix, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class LesionDiffusionError(Exception):
    """Base class for errors caused by user input or configuration."""


class ReportError(LesionDiffusionError):
    """A structured report has an unknown attribute or value."""


class CatalogError(LesionDiffusionError):
    """An attribute catalog is malformed or a sampling request is impossible."""


class OrganMapError(LesionDiffusionError):
    """An organ label map cannot be read or mapped to organ names."""


class PlacementError(LesionDiffusionError):
    """No lesion box satisfies the report's placement rule."""


class BundleError(LesionDiffusionError):
    """A model bundle is missing files or does not match its configuration."""


class TextEncodingError(LesionDiffusionError):
    """A phrase has no cached embedding and no encoder is available."""


class SynthesisError(LesionDiffusionError):
    """Lesion synthesis produced an unusable result (NaN, empty mask, outside the organ)."""


class DataCheckError(LesionDiffusionError):
    """A pretraining dataset failed validation; the message lists every problem."""


class ConfigError(LesionDiffusionError):
    """A YAML configuration file is invalid."""
