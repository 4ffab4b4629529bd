"""PathGuard's offline side: datasets, decoupled models, training, attacks, detectors, evaluation."""

from .bundle import Bundle, BundleError, load_bundle

__all__ = ["Bundle", "BundleError", "load_bundle"]
__version__ = "0.1.0"
