"""``ModelSpec``: which model a command analyses and how it runs, the one way every command loads its denoiser.

"Not given" is ``None`` throughout: no prompt (a text-conditioned model gets the empty prompt, its
unconditional branch), no class label (a class-conditional model gets its null class). Messages name the
field (``device``, ``precision``, ...); the command line maps fields to its flags.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from diffcircuit.errors import ConfigError, DiffcircuitError

__all__ = [
    "MODEL_FIELDS",
    "MODEL_HELP",
    "PRECISIONS",
    "ModelSpec",
    "config_from_mapping",
    "resolve_device",
]

C = TypeVar("C")

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

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str | None = "config"):
        """A validated config of this class from plain values (``config_from_mapping``)."""
        return config_from_mapping(cls, values, source=source)

    @property
    def model_spec(self) -> ModelSpec:
        """Just the model's fields (a command's config is a ``ModelSpec`` with its own settings added)."""
        return ModelSpec(**{name: getattr(self, name) for name in MODEL_FIELDS})


MODEL_FIELDS = tuple(f.name for f in fields(ModelSpec))

# each ModelSpec field in a line: every command's help for the flag that sets it, and the config file's comment
MODEL_HELP = {
    "model": "'embedded', a local diffusers folder, or a hub id such as google/ddpm-celebahq-256",
    "allow_pickle": "allow pickle (.bin) weights; only for sources you trust",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "precision": "fp32, or bf16/fp16 autocast for the forward passes (statistics accumulate in fp32)",
    "prompt": "text-conditioned models: the prompt for every image (none: the empty prompt, the unconditional branch)",
    "prompt_embeds": "text-conditioned models: a safetensors file of prompt embeddings instead of a prompt",
    "class_label": "class-conditional models (DiT): the class for every image (none: the null class)",
}


def config_from_mapping(
    cls: type[C], values: Mapping[str, Any], *, source: str | None = "config"
) -> C:
    """A validated config dataclass from plain values (a YAML file, command-line text): each value is checked
    against its field's type; lists and "100,500" text become tuples. Unknown or ill-typed keys are named.

    ``source`` starts each message (a file's name); ``None`` means the command line: messages then name the bare
    field and carry it (``DiffcircuitError.fields``), so that the CLI shows the flag that sets it."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{source}: " if source is not None else ""
        raise ConfigError(
            f"{where}unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
        )
    return cls(**{key: _coerce(key, value, hints[key], source) for key, value in values.items()})


def _coerce(key: str, value, hint, source: str | None):
    """Check one value against its field type; lists become tuples, "100,500" strings become tuples (a fixed-length
    tuple such as ``tuple[int, int]`` must have that length); an optional field (``str | None``) takes None or its
    type."""
    if type(None) in typing.get_args(hint) and typing.get_origin(hint) in (
        typing.Union,
        types.UnionType,
    ):
        inner = [h for h in typing.get_args(hint) if h is not type(None)][0]
        return None if value is None else _coerce(key, value, inner, source)
    if source is None:
        bad: DiffcircuitError = ConfigError(f"{key} must be {_describe(hint)}, not {value!r}", key)
    else:
        bad = DiffcircuitError(f"{source}: {key!r} must be {_describe(hint)}, not {value!r}")
    if hint in (bool, int, str):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    args = typing.get_args(hint)  # tuple[int, ...], tuple[int, int], tuple[tuple[int, ...], ...]
    inner, length = args[0], None if args[-1] is Ellipsis else len(args)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
        if not all(value):  # "" or "100," or "a,,b": an empty part is a typo, not nothing
            raise bad
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]  # YAML's `timesteps: 500`: one value
    if not isinstance(value, (list, tuple)) or length not in (None, len(value)):
        raise bad
    try:
        return tuple(
            _coerce(
                key, inner(v) if inner in (int, float) and isinstance(v, str) else v, inner, source
            )
            for v in value
        )
    except (ValueError, DiffcircuitError):
        raise bad from None


def _describe(hint) -> str:
    simple = {bool: "true or false", int: "an integer", str: "a string", float: "a number"}
    if hint in simple:
        return simple[hint]
    args = typing.get_args(hint)
    if args[-1] is not Ellipsis:
        return "two comma-separated integers LO,HI" if len(args) == 2 else f"{len(args)} values"
    if typing.get_origin(args[0]) is tuple:
        return "groups of comma-separated integers like 100,300"
    return {
        int: "comma-separated integers like 100,500,900",
        float: "comma-separated numbers like 0.02,0.05",
    }.get(args[0], "a comma-separated list of names")
