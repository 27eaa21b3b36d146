"""``ModelSpec``: which model a command analyses and how it runs, the one way every command loads its denoiser.

"Not given" is ``None`` throughout: no prompt (a text-conditioned model gets the empty prompt, its
unconditional branch), no class label (a class-conditional model gets its null class). Messages name the
field (``device``, ``precision``, ...); the command line maps fields to its flags.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

from diffcircuit.errors import ConfigError

__all__ = ["MODEL_FIELDS", "PRECISIONS", "ModelSpec", "resolve_device"]

PRECISIONS = ("fp32", "bf16", "fp16")


def _device_type(device: str) -> str | None:
    import torch

    try:
        return torch.device(device).type
    except RuntimeError:
        return None


def resolve_device(device: str) -> str:
    """``"auto"`` -> cuda when available, else cpu; an unavailable cuda is refused in one line."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if _device_type(device) == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device}: this machine has no CUDA GPU (use cpu or auto)", "device"
        )
    return device


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which model (``"embedded"``, a local diffusers folder or a hub id), whether pickle weights may load, where and
    in which precision it runs, and a conditional model's input (a prompt, its embeddings, or a class label).

    Every command's config is one of these with its own settings added (``RunConfig(ModelSpec)``, ...), validated in
    ``__post_init__``; ``load()`` is the one way a command gets its denoiser."""

    model: str = "embedded"
    allow_pickle: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = (
        "fp32"  # forward passes in fp32, or autocast to bf16/fp16 (statistics stay fp32)
    )
    prompt: str | None = (
        None  # a text-conditioned model's prompt (None: the empty prompt, the unconditional branch)
    )
    prompt_embeds: str | None = (
        None  # or a safetensors file with its embeddings (tensor "prompt_embeds")
    )
    class_label: int | None = None  # a class-conditional model's class (None: its null class)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(
                f"model must name 'embedded', a folder or a hub id, not {self.model!r}", "model"
            )
        if self.device != "auto" and _device_type(self.device) not in ("cpu", "cuda"):
            raise ConfigError(
                f"device must be cpu, cuda, cuda:N or auto, not {self.device!r}", "device"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}",
                "precision",
            )
        if self.class_label is not None and self.class_label < 0:
            raise ConfigError(f"class_label must be >= 0, not {self.class_label}", "class_label")
        if self.prompt is not None and self.prompt_embeds is not None:
            raise ConfigError("give prompt or prompt_embeds, not both", "prompt", "prompt_embeds")

    @property
    def torch_device(self) -> str:
        """``device`` with "auto" resolved (cuda on a machine without one is refused here)."""
        return resolve_device(self.device)

    def load(self):
        """The denoiser, on ``torch_device``, with a conditional model's conditioning (``load_conditioned``)."""
        from diffcircuit.models.loading import load_conditioned

        return load_conditioned(
            self.model,
            allow_pickle=self.allow_pickle,
            device=self.torch_device,
            prompt=self.prompt,
            prompt_embeds=self.prompt_embeds,
            class_label=self.class_label,
        )

    def autocast(self):
        """Mixed precision for the forward passes when ``precision`` asks (statistics stay fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=_device_type(self.torch_device), dtype=dtype)

    @property
    def model_spec(self) -> ModelSpec:
        """Just the model's fields (a command's config is a ``ModelSpec`` with its own settings added)."""
        return ModelSpec(**{name: getattr(self, name) for name in MODEL_FIELDS})


MODEL_FIELDS = tuple(f.name for f in fields(ModelSpec))
