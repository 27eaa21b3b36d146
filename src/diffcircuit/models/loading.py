"""Load any diffusers denoiser from a hub id or a local folder, safely.

A *denoiser* is the network (``UNet2DModel`` today) plus the noise scheduler that defines its
timesteps. Two folder layouts are understood, the two diffusers itself writes:

- a pipeline folder: ``model_index.json`` with the network in ``unet/`` (or ``transformer/``) and
  the scheduler in ``scheduler/``;
- a model folder: ``config.json`` + weights, with ``scheduler_config.json`` beside them if any.

Without a scheduler config the DDPM default (1,000 linear-β steps) is used; a flow-matching scheduler
(SD3) is read as its exact DDPM equivalent (``models.flow``). A pipeline folder's ``vae/`` or ``vqvae/``
makes it a latent model (``models.latent``). Weights are loaded
from safetensors only; a folder that has only pickle weights (``.bin``, ``.pt``, ``.ckpt``) is
refused unless ``allow_pickle=True``, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcircuit.errors import ConfigError, DiffcircuitError, ModelError
from diffcircuit.models.conditioning import Captions, Conditioning, conditioning_kwargs
from diffcircuit.models.configfile import read_json
from diffcircuit.models.diffusion import PREDICTION_TYPES, eps_from_output, model_device
from diffcircuit.models.flow import FlowAdapter, flow_betas, flow_sigmas, is_flow_matching
from diffcircuit.models.latent import LatentCodec
from diffcircuit.models.needs import needed_inputs
from diffcircuit.models.packing import is_packed, packed_inputs, unpack
from diffcircuit.models.pipeline_text import is_pooled
from diffcircuit.models.prompts import caption_conditioning, make_conditioning

__all__ = [
    "Denoiser",
    "EMBEDDED_MODEL",
    "load_conditioned",
    "load_denoiser",
    "save_denoiser",
    "unconditional_input",
    "use_captions",
]

EMBEDDED_MODEL = "embedded"
_EMBEDDED_DIR = Path(__file__).parent / "embedded" / "tiny-ddpm-32"
_NETWORK_SUBFOLDERS = ("unet", "transformer")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


Rows = tuple[str, "np.ndarray | Sequence[int]"]  # (dataset, image indices in batch order)
Network = Any  # a diffusers model (``ModelMixin``): its ``config`` and forward are its family's


@dataclass(frozen=True, kw_only=True, eq=False)
class Denoiser:
    """A loaded network with its scheduler, where its weights came from, and everything its forward needs besides
    (x_t, t): the conditioning, the flow-matching and packing adapters, each captioned dataset's captions. The
    network itself stays as diffusers built it; ``predict`` / ``predict_eps`` pass all of it explicitly."""

    network: Network
    scheduler: Any  # DDPMScheduler: the noise schedule (alphas_cumprod) and prediction_type
    model_path: Path  # the local folder the network's weights were read from
    source: str  # what the user asked for: "embedded", a hub id or a folder
    conditioning: Conditioning | None = (
        None  # a conditional network's input for every forward (``load_conditioned``)
    )
    codec: LatentCodec | None = (
        None  # latent models: the pipeline's autoencoder, images' way in (``models.latent``)
    )
    process: str = (
        "ddpm"  # "flow-matching": a velocity model read through its DDPM equivalent (``flow``)
    )
    latent_size: int | None = (
        None  # packed (Flux) models, whose config has no sample size: the autoencoder's
    )
    flow: FlowAdapter | None = (
        None  # flow-matching models: how DDPM's (x_t, t) map to the flow's and v to ε
    )
    captions: dict[str, Captions] = field(
        default_factory=dict
    )  # dataset -> its images' own conditioning

    @property
    def sample_size(self) -> int:
        """The side of the network's input map (latent models: in latent cells)."""
        if self.latent_size is not None:
            return self.latent_size
        size = self.network.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def in_channels(self) -> int:
        """Channels of the input map (a packed model's tokens hold 2x2 patches of it)."""
        return int(self.network.config.in_channels) // (4 if is_packed(self.network) else 1)

    @property
    def image_size(self) -> int:
        """The side of the images analysed, in pixels (a latent model's are its autoencoder's)."""
        return self.sample_size * (self.codec.factor if self.codec else 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def check_timesteps(self, timesteps) -> None:
        """Refuse timesteps outside the model's range, or where x₀ cannot be inferred (ᾱ = 0: pure noise)."""
        n = int(self.scheduler.config.num_train_timesteps)
        bad = [int(t) for t in timesteps if not 0 <= int(t) < n]
        if not list(timesteps) or bad:
            raise ConfigError(
                f"timesteps {bad or '(none)'} are outside the model's 0..{n - 1}", "timesteps"
            )
        pure = [int(t) for t in timesteps if float(self.alphas_cumprod[int(t)]) == 0.0]
        if pure:
            raise ConfigError(
                f"timesteps {pure} are pure noise for this model (ᾱ = 0): x₀ cannot be inferred there",
                "timesteps",
            )

    def weights_sha256(self) -> str:
        """A hash of the network's weights (names, dtypes, shapes and bytes): which model a run analysed."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @property
    def prediction_type(self) -> str:
        """What the network outputs: "epsilon", "v_prediction" or "sample" (the scheduler's setting)."""
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        conditioning: Conditioning | None = None,
        rows: Rows | None = None,
    ) -> torch.Tensor:
        """The network's prediction at ``x_t`` ``[batch, C, H, W]`` and timestep indices ``t`` (``[batch]`` or a
        scalar), in the scheduler's parametrisation (``prediction_type``; a flow model's ε, a packed model's
        latent map), on the network's device. ``conditioning``: a conditional model's input for this call
        (default: the one it was loaded with; guidance's other branch is ``unconditional_input(den)``);
        ``rows`` = (dataset, image indices in batch order): a captioned dataset's images each get their own
        caption. Inside ``instrument(den, ...)`` the heads are captured or intervened on as that context says."""
        device = model_device(self.network)
        x_t = x_t.to(device)
        t = t.to(device).expand(len(x_t)) if t.ndim == 0 else t.to(device)
        kwargs = self._conditioning_kwargs(len(x_t), device, conditioning, rows)
        x_in, timestep, sigma = (x_t, t, None) if self.flow is None else self.flow.inputs(x_t, t)
        if is_packed(self.network):  # Flux: 2x2 latent patches as tokens
            tokens, kwargs = packed_inputs(
                x_in, kwargs, distilled=bool(getattr(self.network.config, "guidance_embeds", False))
            )
            output = unpack(
                self.network(tokens, timestep=timestep, **kwargs).sample, *x_in.shape[-2:]
            )
        else:
            output = self.network(x_in, timestep=timestep, **kwargs).sample
        if self.flow is None or sigma is None:
            return output
        return self.flow.eps(x_in, sigma, output)

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        conditioning: Conditioning | None = None,
        rows: Rows | None = None,
    ) -> torch.Tensor:
        """The ε-prediction ``predict`` implies, in fp32, whatever the network outputs (ε, v or x₀; a flow model's
        velocity; a packed model's tokens): the one way the analyses run the model."""
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        output = self.predict(x_t, t, conditioning=conditioning, rows=rows)
        return self.eps_hat(output, x_t.to(output.device), t.to(output.device))

    def _conditioning_kwargs(
        self, batch: int, device, conditioning: Conditioning | None, rows: Rows | None
    ) -> dict:
        """The forward's conditioning inputs: a captioned dataset's rows, else the given or loaded conditioning."""
        if conditioning is not None and self.conditioning is None:
            raise ModelError(
                f"{type(self.network).__name__} is unconditional: a conditioning does not apply"
            )
        if rows is not None and rows[0] in self.captions and conditioning is None:
            index = torch.as_tensor(np.asarray(rows[1]), dtype=torch.long)
            return conditioning_kwargs(self.captions[rows[0]].conditioning, batch, device, index)
        given = conditioning or self.conditioning
        return {} if given is None else conditioning_kwargs(given, batch, device)

    def caption_tokens(self, dataset: str) -> tuple[tuple[str | None, ...], ...] | None:
        """Each image's prompt tokens for a captioned ``dataset``; None when its images share the conditioning."""
        captions = self.captions.get(dataset)
        return None if captions is None else captions.tokens

    def caption_key_counts(self, dataset: str, rows) -> torch.Tensor | None:
        """Each image's number of unmasked text keys for a dataset whose captions are masked per image (PixArt)."""
        captions = self.captions.get(dataset)
        return None if captions is None else captions.key_counts(rows)

    def eps_hat(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε-prediction implied by the network's ``output`` at ``x_t``: every error is measured in ε,
        in fp32 (an fp16/bf16 output under autocast is widened first). A network that also predicts its
        variance (DiT: twice the input's channels) contributes its first half."""
        if output.shape[1] == 2 * x_t.shape[1]:
            output = output[:, : x_t.shape[1]]
        return eps_from_output(output.float(), x_t, t, self.alphas_cumprod, self.prediction_type)


def _resolve_folder(source: str, allow_pickle: bool) -> Path:
    """A local folder for ``source``: the embedded model, an existing folder, or a hub download."""
    if source == EMBEDDED_MODEL:
        if not (_EMBEDDED_DIR / "model_index.json").exists():
            raise ModelError(
                f"the embedded model is missing from {_EMBEDDED_DIR}; reinstall diffcircuit"
            )
        return _EMBEDDED_DIR
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model {source!r} is a file; give a diffusers model or pipeline folder"
            )
        if (
            path.resolve().name in _NETWORK_SUBFOLDERS
            and (path / ".." / "model_index.json").exists()
        ):
            return (
                path.resolve().parent
            )  # a pipeline's unet/ or transformer/: its scheduler and VAE are beside it
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")) or " " in source:
        raise ModelError(
            f"model {source!r} is neither an existing folder nor a hub id like 'owner/name'"
        )
    return _download(source, allow_pickle)


def _download(repo_id: str, allow_pickle: bool) -> Path:
    """Fetch configs and safetensors weights; pickle weights only when allowed and nothing else exists."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.md"])
        )
        if allow_pickle and not any(folder.rglob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin", "*.md"]))
    except Exception as exc:  # network, auth, missing repo: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not fetch model {repo_id!r} from the hub: {first}") from None
    if not any(folder.rglob("*.safetensors")) and not allow_pickle:
        raise ModelError(
            f"hub repo {repo_id!r} has no .safetensors weights; if it ships pickle "
            "weights (.bin) and you trust it, set allow_pickle",
            "allow_pickle",
        )
    return folder


def _network_folder(root: Path) -> Path:
    """``unet/`` or ``transformer/`` of a pipeline folder, else the folder itself if it has a config."""
    for sub in _NETWORK_SUBFOLDERS:
        if (root / sub / "config.json").exists():
            return root / sub
    if (root / "config.json").exists():
        return root
    raise ModelError(
        f"{root} is not a diffusers folder: no config.json in it or in unet/ or transformer/"
    )


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors; refuses pickle-only folders unless allowed."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return True
    pickles = [p.name for p in files if p.suffix in _PICKLE_SUFFIXES]
    if not pickles:
        raise ModelError(f"no weights in {folder}: expected a .safetensors file")
    if not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights ({pickles[0]}); convert them to safetensors, "
            "or set allow_pickle if you trust the source",
            "allow_pickle",
        )
    return False


def _network_class(folder: Path):
    import diffusers

    config = read_json(folder / "config.json")
    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ModelError(
            f"{folder / 'config.json'} names {name!r}, which is not a diffusers model class"
        )
    return cls


def _load_scheduler(root: Path, network_folder: Path, image_tokens: int | None = None):
    """The DDPM scheduler defining the model's noise levels, and the flow σ grid if it is a flow model.

    Schedulers of the DDPM family (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) share their β schedule,
    which is all the analyses need; a flow-matching one becomes its exact DDPM equivalent (``models.flow``).
    """
    from diffusers import DDPMScheduler

    for candidate in (root / "scheduler", network_folder, root):
        path = candidate / "scheduler_config.json"
        if not path.exists():
            continue
        config = read_json(path)
        if is_flow_matching(config):
            sigmas = flow_sigmas(config, image_tokens)
            return DDPMScheduler(
                num_train_timesteps=len(sigmas),
                trained_betas=flow_betas(sigmas).numpy(),
                prediction_type="epsilon",
                clip_sample=False,
            ), sigmas
        if "beta_schedule" not in config and "trained_betas" not in config:
            raise ModelError(
                f"{path} defines {config.get('_class_name', 'a scheduler')}, which has no DDPM "
                "noise schedule (β); diffcircuit analyses DDPM-family and flow-matching models"
            )
        return DDPMScheduler.from_pretrained(candidate), None
    return DDPMScheduler(num_train_timesteps=1000), None


def _check_finite(network: torch.nn.Module, folder: Path) -> None:
    """Refuse weights with NaN or infinity: they would propagate silently into every table."""
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(
                f"model weights in {folder} contain NaN or infinite values (first in {name})"
            )


def load_denoiser(
    source: str = EMBEDDED_MODEL, *, allow_pickle: bool = False, device: str = "cpu"
) -> Denoiser:
    """Load a denoiser from ``"embedded"``, a local diffusers folder or a hub id.

    The scheduler is read from the folder when it has one (as ``DDPMScheduler``, whose noise
    schedule is what the analyses need), else DDPM with 1,000 steps.
    """
    root = _resolve_folder(source, allow_pickle)
    folder = _network_folder(root)
    use_safetensors = _check_weights(folder, allow_pickle)
    cls = _network_class(folder)
    try:
        network = cls.from_pretrained(folder, use_safetensors=use_safetensors)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load {cls.__name__} from {folder}: {first}") from None
    _check_finite(network, folder)
    network.eval().requires_grad_(False).to(device)
    codec = _load_codec(root if folder != root else None, network, allow_pickle, device)
    packed = is_packed(
        network
    )  # Flux: 2x2 latent patches as tokens, its size given by the autoencoder
    size = None
    if packed:
        if codec is None:
            raise ModelError(
                f"{type(network).__name__} takes packed latents: give its pipeline folder, with vae/"
            )
        vae: Any = codec.vae
        size = int(vae.config.sample_size) // codec.factor
    scheduler, sigmas = _load_scheduler(
        root, folder, image_tokens=None if size is None else (size // 2) ** 2
    )
    # a velocity-predicting flow model, read as the ε-predicting DDPM it equals (Flux takes σ, SD3 σ·N)
    flow = None if sigmas is None else FlowAdapter(sigmas, 1.0 if packed else float(len(sigmas)))
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelError(
            f"model {source!r}: unsupported prediction_type {kind!r} (supported: {', '.join(PREDICTION_TYPES)})"
        )
    return Denoiser(
        network=network,
        scheduler=scheduler,
        model_path=folder,
        source=source,
        codec=codec,
        process="ddpm" if sigmas is None else "flow-matching",
        latent_size=size,
        flow=flow,
    )


def _load_codec(
    root: Path | None, network: Network, allow_pickle: bool, device: str
) -> LatentCodec | None:
    """The pipeline's autoencoder (``vae/`` or ``vqvae/``) when the network works in its latent space, else None."""
    folder = next(
        (root / sub for sub in ("vae", "vqvae") if root and (root / sub / "config.json").exists()),
        None,
    )
    if folder is None:
        return None
    cls = _network_class(folder)
    try:
        vae = cls.from_pretrained(folder, use_safetensors=_check_weights(folder, allow_pickle))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load {cls.__name__} from {folder}: {first}") from None
    _check_finite(vae, folder)
    codec = LatentCodec.from_vae(vae.eval().requires_grad_(False).to(device))
    takes = int(network.config.in_channels) // (4 if is_packed(network) else 1)
    if codec.latent_channels != takes:
        raise ModelError(
            f"{folder.name}/ gives {codec.latent_channels}-channel latents but the network takes "
            f"{takes} channels (e.g. an inpainting model): not supported"
        )
    return codec


def load_conditioned(
    source: str = EMBEDDED_MODEL,
    *,
    prompt: str | None = None,
    prompt_embeds: str | None = None,
    class_label: int | None = None,
    allow_pickle: bool = False,
    device: str = "cpu",
) -> Denoiser:
    """``load_denoiser``, with a conditional network's conditioning for its forwards (``models.conditioning``;
    default: the unconditional input, the empty prompt or the null class)."""
    import dataclasses

    den = load_denoiser(source, allow_pickle=allow_pickle, device=device)
    cond = make_conditioning(
        den.network,
        _pipeline_root(den),
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
        allow_pickle=allow_pickle,
    )
    return den if cond is None else dataclasses.replace(den, conditioning=cond)


def unconditional_input(den: Denoiser, *, allow_pickle: bool = False) -> Conditioning:
    """A conditional model's unconditional input: guidance's other branch. The embeddings file's negative prompt
    (``negative_prompt_embeds``) when it has one, else the empty prompt or the null class."""
    if den.conditioning is None:
        raise ModelError(f"{type(den.network).__name__} is unconditional: guidance does not apply")
    if den.conditioning.unconditional is not None:
        return den.conditioning.unconditional
    try:
        empty = make_conditioning(den.network, _pipeline_root(den), allow_pickle=allow_pickle)
        if empty is None:  # cannot happen: the model has a conditioning, so it needs one
            raise ModelError(f"{type(den.network).__name__} has no unconditional input")
        return empty
    except DiffcircuitError:
        if not is_pooled(den.network):
            raise
        raise ModelError(
            "guidance for this model needs its unconditional branch: add negative_prompt_embeds and "
            "negative_pooled_prompt_embeds (the encoded empty prompt) to the prompt_embeds file, "
            "or give a pipeline folder with its text encoders",
            "prompt_embeds",
        ) from None


def use_captions(
    den: Denoiser, dataset: str, captions, *, allow_pickle: bool = False, spec: str = ""
) -> str | None:
    """Give each image of ``dataset`` its own caption (encoded by the pipeline's text encoder) in every forward of
    its rows (``den.predict(..., rows=(dataset, rows))``); returns what was done, for the manifest (None: no
    captions)."""
    if not captions:
        return None
    if "encoder_hidden_states" not in needed_inputs(den.network):
        return "captions ignored: the model is not text-conditioned"
    cond, tokens = caption_conditioning(
        den.network, _pipeline_root(den), captions, allow_pickle=allow_pickle, spec=spec
    )
    den.captions[dataset] = Captions(cond, tokens)
    return "each image's own caption"


def _pipeline_root(den: Denoiser) -> Path:
    return den.model_path.parent if den.model_path.name in _NETWORK_SUBFOLDERS else den.model_path


def save_denoiser(folder: str | Path, network: Network, scheduler) -> Path:
    """Write a standard diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(network).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
