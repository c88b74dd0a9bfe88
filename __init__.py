"""sslrun: distributed self-supervised pretraining for vision.

Layers (dependencies point one way): ``sslrun.plugins`` -> ``sslrun.core``; ``sslrun.cluster`` -> ``sslrun.core``;
``sslrun.cli`` -> both. ``sslrun.core`` never imports Ray.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
