"""diffcircuit: circuit-level mechanistic interpretability for diffusion models.

The notebook API::

    import diffcircuit as dc
    den = dc.load_denoiser()                                   # the embedded model
    faces = dc.model_images(den, "faces", n=16)                # latent models: encoded by their VAE
    obs = dc.observe(den, faces, timesteps=[100, 500])        # .heads, .images: DataFrames
    obs.heads.groupby("layer").entropy_norm.mean()
"""

from diffcircuit._threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before anything imports torch: idle OpenMP threads sleep (see diffcircuit._threads)

from diffcircuit._version import __version__  # noqa: E402
from diffcircuit.data.spec import ImageSet, load_images  # noqa: E402
from diffcircuit.errors import DiffcircuitError  # noqa: E402
from diffcircuit.instrument import hooks  # noqa: E402
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry  # noqa: E402
from diffcircuit.instrument.session import HookContext, instrument, probe_registry  # noqa: E402
from diffcircuit.metrics.observe import Observation, observe  # noqa: E402
from diffcircuit.models.latent import model_images  # noqa: E402
from diffcircuit.models.loading import Denoiser, load_denoiser  # noqa: E402
from diffcircuit.models.spec import ModelSpec  # noqa: E402
from diffcircuit.protocol.config import RunConfig  # noqa: E402
from diffcircuit.report.result import CircuitRecord, Claim, RunResult, Summary  # noqa: E402

__all__ = [
    "Denoiser",
    "DiffcircuitError",
    "HeadAddress",
    "HeadRegistry",
    "CircuitRecord",
    "Claim",
    "HookContext",
    "ImageSet",
    "ModelSpec",
    "Observation",
    "RunConfig",
    "RunResult",
    "Summary",
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


def run(out_dir, config: RunConfig | None = None, *, progress=None, **fields) -> RunResult:
    """The main job end to end: observe, intervene, test; write the run directory, ``summary.json`` and
    ``report.html``; return the typed result. ``fields`` are ``RunConfig`` field names, on top of ``config``
    (default: the defaults), e.g. ``dc.run("runs/x", n=8, timesteps=[500], ablate_n=0)``; a killed run resumes."""
    from diffcircuit.protocol.runner import run_protocol
    from diffcircuit.report import finalize_run

    if isinstance(out_dir, RunConfig):  # the older order, run(config, out_dir)
        out_dir, config = config, out_dir
    if fields:
        # parsed and validated as a config file's values are: unknown names and bad values are named
        base = config.to_dict() if config is not None else {}
        config = RunConfig.from_mapping(base | fields, source="run()")
    return run_protocol(config or RunConfig(), out_dir, progress=progress, finish=finalize_run)
