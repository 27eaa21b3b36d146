"""diffcircuit: circuit-level mechanistic interpretability for diffusion models.

The notebook API::

    import diffcircuit as dc
    den = dc.load_denoiser()                                   # the embedded model
    faces = dc.model_images(den, "faces", n=16)                # latent models: encoded by their VAE
    heads, images = dc.observe(den, faces.images, timesteps=[100, 500], pictures=faces.pixels)
    heads.groupby("layer").entropy_norm.mean()
"""

from diffcircuit._threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before anything imports torch: idle OpenMP threads sleep (see diffcircuit._threads)

from diffcircuit._version import __version__  # noqa: E402

from diffcircuit.data.spec import ImageSet, load_images  # noqa: E402
from diffcircuit.errors import DiffcircuitError  # noqa: E402
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry  # noqa: E402
from diffcircuit.instrument.session import HookContext, instrument, probe_registry  # noqa: E402
from diffcircuit.instrument import hooks  # noqa: E402
from diffcircuit.metrics.observe import observe  # noqa: E402
from diffcircuit.models.latent import model_images  # noqa: E402
from diffcircuit.models.loading import Denoiser, load_denoiser  # noqa: E402
from diffcircuit.protocol.config import RunConfig  # noqa: E402

__all__ = [
    "Denoiser",
    "DiffcircuitError",
    "HeadAddress",
    "HeadRegistry",
    "HookContext",
    "ImageSet",
    "RunConfig",
    "__version__",
    "hooks",
    "instrument",
    "load_denoiser",
    "load_images",
    "model_images",
    "observe",
    "probe_registry",
    "run",
]


def run(config: RunConfig, out_dir, *, progress=None) -> dict:
    """The main job end to end: observe, write tables, then summary.json and report.html."""
    from diffcircuit.protocol.runner import run_protocol
    from diffcircuit.report import finalize_run

    result = run_protocol(config, out_dir, progress=progress)
    return finalize_run(result.out_dir)
