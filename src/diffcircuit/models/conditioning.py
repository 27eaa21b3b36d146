"""Conditioning for conditional denoisers: what their forward needs besides (x_t, t).

- A text-conditioned UNet (``UNet2DConditionModel``) needs ``encoder_hidden_states``: a prompt encoded
  by the pipeline folder's own ``tokenizer/`` and ``text_encoder/`` (through transformers: the
  ``text`` extra), or embeddings given as a safetensors file (tensor ``prompt_embeds``,
  ``[tokens, dim]`` or ``[1, tokens, dim]``).
- A class-conditional model (DiT, or a UNet with ``num_class_embeds``) needs ``class_labels``.
- SD3, Flux and SDXL need the text tokens and a pooled summary (SDXL also its size conditions): a prompt encoded by their
  pipeline's own ``encode_prompt`` (``models.pipeline_text``), or a safetensors file with
  ``prompt_embeds`` and ``pooled_prompt_embeds`` (``negative_*`` too, for guidance).
- A data folder with captions gives each of its images its own prompt (``caption_conditioning``,
  kept as ``Captions`` by the ``Denoiser``): a forward of rows ``rows`` of that dataset gets those rows.

The default is the model's *unconditional* input, the branch classifier-free guidance contrasts
with: the empty prompt, and DiT's null class. The ``Denoiser`` passes the conditioning explicitly to
every forward (``conditioning_kwargs``: expanded to the batch, or one row per image), so every analysis
runs unchanged on a conditional model while the network stays as diffusers built it; its head registry
then includes the cross-attention layers, whose keys are the prompt's tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcircuit.errors import DiffcircuitError
from diffcircuit.models.configfile import read_json
from diffcircuit.models.pipeline_text import (
    encode_with_pipeline,
    is_pooled,
    pooled_dims,
    pooled_kwargs,
    zeros_for_empty_prompt,
)

__all__ = ["Captions", "Conditioning", "caption_conditioning", "conditioning_kwargs", "make_conditioning", "needed_inputs",
           "placeholder_text"]


@dataclass(frozen=True)
class Conditioning:
    """Forward keyword inputs with a batch dimension of 1, what they are in words, and the prompt's tokens
    (the cross-attention keys that carry text: start, words, end; padding left out, or named None where real
    tokens follow it, as SD3's T5 tokens follow CLIP's padded 77)."""

    kwargs: dict[str, torch.Tensor | dict]
    description: str
    tokens: tuple[str | None, ...] = ()
    unconditional: Conditioning | None = None  # guidance's other branch, when the embeddings file gives it


def needed_inputs(network: torch.nn.Module) -> list[str]:
    """The conditioning inputs ``network``'s forward cannot run without."""
    params = inspect.signature(network.forward).parameters
    needs = [n for n in ("encoder_hidden_states", "class_labels")
             if n in params and params[n].default is inspect.Parameter.empty]
    config = network.config
    if getattr(config, "cross_attention_dim", None) and "encoder_hidden_states" in params and "encoder_hidden_states" not in needs:
        needs.append("encoder_hidden_states")  # PixArt-style transformers: optional in the signature, needed in fact
    if is_pooled(network):  # SD3, Flux, SDXL: the text tokens and a pooled summary
        pooled = "pooled_projections" if "pooled_projections" in params else "added_cond_kwargs"
        needs += [n for n in ("encoder_hidden_states", pooled) if n not in needs]
    labelled = getattr(config, "num_class_embeds", None) or (  # DiT: class labels drive its adaLN-Zero
        getattr(config, "num_embeds_ada_norm", None) and getattr(config, "norm_type", None) == "ada_norm_zero")
    if labelled and "class_labels" in params and "class_labels" not in needs:
        needs.append("class_labels")
    return needs


@dataclass(frozen=True)
class Captions:
    """A captioned dataset's per-image conditioning: ``conditioning.kwargs`` with one row per image, and each
    image's prompt tokens."""

    conditioning: Conditioning
    tokens: tuple[tuple[str | None, ...], ...]

    def key_counts(self, rows) -> torch.Tensor | None:
        """Each image's number of unmasked text keys where captions are masked per image (PixArt), else None."""
        mask = self.conditioning.kwargs.get("encoder_attention_mask")
        return None if mask is None else mask[torch.as_tensor(np.asarray(rows), dtype=torch.long)].sum(1)


def conditioning_kwargs(conditioning: Conditioning, batch: int, device: torch.device,
                        rows: torch.Tensor | None = None) -> dict:
    """The forward keyword inputs of ``conditioning`` for a batch: its rows ``rows`` (per-image conditioning,
    one row per batch row), or its one row expanded to ``batch`` rows; nested dicts (SDXL's
    ``added_cond_kwargs``) likewise."""
    def expand(value):
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if rows is not None:
            return value[rows.to(value.device)].to(device)
        return value.to(device).expand(batch, *value.shape[1:])

    if rows is not None and len(rows) != batch:
        raise DiffcircuitError(f"a batch of {batch} images was given {len(rows)} captioned rows")
    return {name: expand(value) for name, value in conditioning.kwargs.items()}


def placeholder_text(network: torch.nn.Module) -> Conditioning | None:
    """One zero text token for a network that only needs ``encoder_hidden_states`` (a text-conditioned UNet or
    PixArt): enough to run it for its geometry, not to analyse it. None where it needs more (pooled models)."""
    needs = needed_inputs(network)
    if needs != ["encoder_hidden_states"] or is_pooled(network):
        return None
    dim = int(getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim)
    return Conditioning({"encoder_hidden_states": torch.zeros(1, 1, dim), **_added_conditions(network)},
                        "a placeholder token (no prompt given)")


def _null_class(network: torch.nn.Module) -> int | None:
    """DiT's null class (the last row of its label table when trained with label dropout), else None."""
    for module in network.modules():
        table = getattr(module, "embedding_table", None)
        classes = getattr(module, "num_classes", None)
        if isinstance(table, torch.nn.Embedding) and classes is not None and table.num_embeddings == classes + 1:
            return int(classes)
    return None


def _class_labels(network: torch.nn.Module, class_label: int | None) -> Conditioning:
    classes = getattr(network.config, "num_embeds_ada_norm", None) or getattr(network.config, "num_class_embeds", None)
    if class_label is None:
        null = _null_class(network)
        if null is None:
            raise DiffcircuitError(f"{type(network).__name__} needs a class label and has no null class: pass --class-label K")
        return Conditioning({"class_labels": torch.tensor([null])}, f"null class {null} (unconditional)")
    if classes is not None and not 0 <= class_label < int(classes):
        raise DiffcircuitError(f"--class-label must be in 0..{int(classes) - 1}, not {class_label}")
    return Conditioning({"class_labels": torch.tensor([class_label])}, f"class {class_label}")


def _read_embeds(path: Path, name: str, dim: int, ndim: int) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, ``[*shape, dim]`` with ``ndim`` axes after a batch axis of 1."""
    from safetensors.torch import load_file

    try:
        embeds = load_file(str(path))[name]
    except KeyError:
        raise DiffcircuitError(f"{path} has no tensor named {name!r}") from None
    except Exception as exc:  # missing, unreadable or not safetensors
        raise DiffcircuitError(f"cannot read prompt embeddings from {path}: {str(exc).splitlines()[0]}") from None
    embeds = embeds[None] if embeds.ndim == ndim else embeds
    if embeds.ndim != ndim + 1 or embeds.shape[0] != 1 or embeds.shape[-1] != dim:
        shape = "[tokens, dim]" if ndim == 2 else "[dim]"
        raise DiffcircuitError(f"{name} in {path} must be {shape} with dim {dim} (a batch axis of 1 allowed), "
                               f"not {list(embeds.shape)}")
    return embeds.float()


def _prompt_embeds(path: Path, dim: int) -> torch.Tensor:
    return _read_embeds(path, "prompt_embeds", dim, 2)


def _has(path: Path, name: str) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return name in f.keys()


def _joint_embeds(network: torch.nn.Module, prompt_embeds: str | None, prompt: str | None, root: Path,
                  allow_pickle: bool) -> Conditioning:
    """SD3 / Flux / SDXL: the text tokens' embeddings and their pooled summary, encoded by the pipeline's own
    ``encode_prompt`` (``models.pipeline_text``; unconditional: the empty prompt), or read from a safetensors
    file: ``prompt_embeds`` and ``pooled_prompt_embeds``, and for guidance's unconditional branch
    ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``."""
    if prompt_embeds is None:
        text = prompt or ""
        (embeds, pooled, names) = encode_with_pipeline(root, [text, ""] if text else [""], allow_pickle=allow_pickle)
        if zeros_for_empty_prompt(root):  # SDXL's unconditional input: zeros in place of the encoded empty prompt
            embeds[-1], pooled[-1], names[-1] = 0.0, 0.0, [None] * len(names[-1])
        kwargs = [pooled_kwargs(network, root, embeds[i:i + 1], pooled[i:i + 1]) for i in range(len(embeds))]
        empty = Conditioning(kwargs[-1], "the empty prompt (unconditional)"
                             + (", as zeros" if zeros_for_empty_prompt(root) else ""), tuple(names[-1]))
        if not text:
            return empty
        return Conditioning(kwargs[0], f"prompt {text!r}", tuple(names[0]), empty)
    path = Path(prompt_embeds)
    dims = pooled_dims(network)

    def read(prefix: str) -> dict:
        return pooled_kwargs(network, root, _read_embeds(path, f"{prefix}prompt_embeds", dims[0], 2),
                             _read_embeds(path, f"{prefix}pooled_prompt_embeds", dims[1], 1))

    given = read("")
    negative = None
    if _has(path, "negative_prompt_embeds"):  # the pipeline's encode_prompt gives the unconditional branch too
        negative = Conditioning(read("negative_"), f"negative prompt embeddings from {prompt_embeds}")
    return Conditioning(given, f"prompt embeddings from {prompt_embeds}",
                        tuple(f"<{i}>" for i in range(given["encoder_hidden_states"].shape[1])), negative)


def _encode_prompt(root: Path, prompt: str, allow_pickle: bool) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The pipeline's text encoder's last hidden state for ``prompt`` (``[1, tokens, dim]``) and its tokens."""
    embeds, tokens = _encode_prompts(root, [prompt], allow_pickle)
    return embeds, tokens[0]


def _encode_prompts(root: Path, prompts, allow_pickle: bool, batch_size: int = 32):
    """``[n, tokens, dim]`` for ``prompts`` (padded to the tokenizer's length) and each prompt's tokens."""
    if not (root / "tokenizer").is_dir() or not (root / "text_encoder" / "config.json").exists():
        raise DiffcircuitError(f"{root} has no tokenizer/ and text_encoder/ to encode a prompt with; "
                               "give --prompt-embeds FILE.safetensors instead")
    try:
        import transformers
    except ImportError:
        raise DiffcircuitError("encoding prompts needs transformers: pip install 'diffcircuit[text]'") from None

    arch = (read_json(root / "text_encoder" / "config.json").get("architectures") or ["CLIPTextModel"])[0]
    cls = getattr(transformers, arch, None)  # CLIPTextModel (Stable Diffusion), T5EncoderModel (PixArt), ...
    if cls is None:
        raise DiffcircuitError(f"{root / 'text_encoder'} names {arch!r}, which transformers does not have")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
        encoder = cls.from_pretrained(root / "text_encoder", use_safetensors=not allow_pickle).eval()
    except Exception as exc:
        raise DiffcircuitError(f"could not load the text encoder of {root}: {str(exc).strip().splitlines()[0]}") from None
    embeds, tokens = [], []
    for lo in range(0, len(prompts), batch_size):
        encoded = tokenizer(list(prompts[lo:lo + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds.append(encoder(encoded.input_ids)[0].float())
        for ids, mask in zip(encoded.input_ids, encoded.attention_mask):
            tokens.append(tuple(tokenizer.convert_ids_to_tokens(ids[: int(mask.sum())])))
    return torch.cat(embeds), tokens


def make_conditioning(network: torch.nn.Module, root: Path, *, prompt: str | None = None,
                      prompt_embeds: str | None = None, class_label: int | None = None,
                      allow_pickle: bool = False) -> Conditioning | None:
    """The conditioning ``network`` needs (None for an unconditional model), from the options given."""
    needs = needed_inputs(network)
    given = [flag for flag, value in (("--prompt", prompt), ("--prompt-embeds", prompt_embeds),
                                      ("--class-label", class_label)) if value is not None]
    if not needs:
        if given:
            raise DiffcircuitError(f"{type(network).__name__} is unconditional: {given[0]} does not apply")
        return None
    if "class_labels" in needs:
        if prompt is not None or prompt_embeds is not None:
            raise DiffcircuitError(f"{type(network).__name__} is class-conditional: give --class-label, not a prompt")
        return _class_labels(network, class_label)
    if class_label is not None:
        raise DiffcircuitError(f"{type(network).__name__} is text-conditioned: give --prompt or --prompt-embeds")
    if prompt is not None and prompt_embeds is not None:
        raise DiffcircuitError("give --prompt or --prompt-embeds, not both")
    if is_pooled(network):
        return _joint_embeds(network, prompt_embeds, prompt, root, allow_pickle)
    dim = int(getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim)
    extra = _added_conditions(network)
    if prompt_embeds is not None:
        path = Path(prompt_embeds)
        embeds = _prompt_embeds(path, dim)
        negative = None
        if _has(path, "negative_prompt_embeds"):
            negative = Conditioning({"encoder_hidden_states": _read_embeds(path, "negative_prompt_embeds", dim, 2), **extra},
                                    f"negative prompt embeddings from {prompt_embeds}")
        return Conditioning({"encoder_hidden_states": embeds, **extra}, f"prompt embeddings from {prompt_embeds}",
                            tuple(f"<{i}>" for i in range(embeds.shape[1])), negative)
    text = prompt or ""
    if _pixart_pipeline(root):  # T5 with a padding mask, as its pipeline encodes prompts
        embeds, _, names = _masked_prompts(root, [text], allow_pickle)
        if embeds.shape[-1] != dim:
            raise DiffcircuitError(f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the model expects {dim}")
        return Conditioning({"encoder_hidden_states": embeds, **extra},
                            f"prompt {text!r}" if text else "the empty prompt (unconditional)", tuple(names[0]))
    embeds, tokens = _encode_prompt(root, text, allow_pickle)
    if embeds.shape[-1] != dim:
        raise DiffcircuitError(f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the UNet expects {dim}")
    return Conditioning({"encoder_hidden_states": embeds, **extra},
                        f"prompt {text!r}" if text else "the empty prompt (unconditional)", tokens)


def _added_conditions(network: torch.nn.Module) -> dict:
    """PixArt's micro-conditions (``added_cond_kwargs``): the pixel resolution and aspect ratio when the model
    uses them (its sample size x the VAE's factor 8), else none."""
    config = network.config
    if getattr(config, "norm_type", None) != "ada_norm_single":
        return {}
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    if not getattr(network, "use_additional_conditions", False):
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return {"added_cond_kwargs": {"resolution": torch.tensor([[h * 8.0, w * 8.0]]), "aspect_ratio": torch.tensor([[h / w]])}}


def _pixart_pipeline(root: Path) -> bool:
    index = root / "model_index.json"
    return index.exists() and str(read_json(index).get("_class_name", "")).startswith("PixArt")


def _masked_prompts(root: Path, prompts: list[str], allow_pickle: bool):
    """PixArt: ``(embeds, mask, names)`` cut to the longest prompt's tokens. Its pipeline pads every prompt to
    120 T5 tokens and masks the padding out of the attention; a masked key gets exactly no attention, so the
    keys after the longest prompt are dropped (the output is unchanged) and the rest stay masked per prompt."""
    embeds, mask, names = encode_with_pipeline(root, prompts, allow_pickle=allow_pickle)
    longest = int(mask.sum(1).max())
    return embeds[:, :longest], mask[:, :longest].float(), [n[:longest] for n in names]


def caption_conditioning(network: torch.nn.Module, root: Path, captions, *, allow_pickle: bool = False,
                         spec: str = "") -> tuple[Conditioning, tuple[tuple[str, ...], ...]]:
    """Per-image conditioning of a text-conditioned ``network`` from one caption per image, encoded by the
    pipeline's text encoder, and each caption's tokens."""
    needs = needed_inputs(network)
    if "encoder_hidden_states" not in needs:
        raise DiffcircuitError(f"{spec or 'the data'} has captions, but {type(network).__name__} is not text-conditioned; "
                               "use a folder without captions.csv / captions.jsonl")
    if is_pooled(network):  # SD3 / Flux / SDXL: the pipeline's own encoders
        embeds, pooled, names = encode_with_pipeline(root, list(captions), allow_pickle=allow_pickle)
        return (Conditioning(pooled_kwargs(network, root, embeds, pooled), f"{len(captions)} captions"),
                tuple(tuple(n) for n in names))
    masked = {}
    if _pixart_pipeline(root):
        embeds, mask, tokens = _masked_prompts(root, list(captions), allow_pickle)
        masked = {"encoder_attention_mask": mask} if (mask < 1).any() else {}
    else:
        embeds, tokens = _encode_prompts(root, list(captions), allow_pickle)
    dim = int(getattr(network.config, "caption_channels", None) or network.config.cross_attention_dim)
    if embeds.shape[-1] != dim:
        raise DiffcircuitError(f"the text encoder gives {embeds.shape[-1]}-dim embeddings; the model expects {dim}")
    rows = len(captions)  # every input gets one row per image (PixArt's micro-conditions are shared)
    extra = {k: {n: v.expand(rows, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for n, v in d.items()}
             for k, d in _added_conditions(network).items()}
    return Conditioning({"encoder_hidden_states": embeds, **masked, **extra}, f"{rows} captions"), tuple(map(tuple, tokens))
