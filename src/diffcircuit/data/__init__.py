"""Image sets: the synthetic generator (with object masks), image folders, the bundled faces and photos."""

from diffcircuit.data.spec import ImageSet, load_images
from diffcircuit.data.synthetic import synthetic_images

__all__ = ["ImageSet", "load_images", "synthetic_images"]
