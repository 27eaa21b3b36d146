"""The ``diffcircuit`` command: parse arguments, build a config, call the Python API, print.

Errors the user can fix (bad arguments, missing files, refused checkpoints) print one line on
stderr and exit non-zero; tracebacks are for bugs.
"""

from __future__ import annotations

import inspect
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from diffcircuit.errors import DiffcircuitError

__all__ = ["app", "main"]

try:  # newer typer vendors its own click; older typer uses click itself
    from typer._click.exceptions import UsageError as _UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError as _UsageError

app = typer.Typer(
    name="diffcircuit",
    help="Circuit-level mechanistic interpretability of diffusion models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from diffcircuit._version import __version__

        print(f"diffcircuit {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Circuit-level mechanistic interpretability of diffusion models."""


console = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option("--model", help="'embedded', a local diffusers folder, or a hub id.")
]
PickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Allow loading pickle (.bin) weights. Only for trusted sources."
    ),
]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt", help="Text-conditioned models: the prompt (default: the empty prompt)."
    ),
]
PromptEmbedsOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt-embeds", help="Text-conditioned models: safetensors file with 'prompt_embeds'."
    ),
]
ClassLabelOpt = Annotated[
    int | None,
    typer.Option(
        "--class-label", help="Class-conditional models (DiT): the class (default: the null class)."
    ),
]
GuidanceOpt = Annotated[
    float,
    typer.Option(
        "--guidance", help="Sampling a conditional model: classifier-free guidance scale (1: none)."
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision", help="fp32, or bf16/fp16 autocast for the forwards (statistics stay fp32)."
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", help="No progress bars; print only the results.")
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        help="CPU threads for this process (0: one per core). On a shared node "
        "give each job its share of the cores.",
    ),
]


def _threads(threads: int) -> None:
    if threads < 0:
        raise DiffcircuitError(f"--threads must be >= 0, not {threads}")
    from diffcircuit._threads import set_threads

    set_threads(threads)


class _Bars:
    """Rich progress bars that appear with the first update (after inputs are validated), one per stage."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.tasks = quiet, None, {}

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(
        self,
        stage: str,
        *,
        completed: int | None = None,
        total: int | None = None,
        advance: int | None = None,
        description: str | None = None,
    ) -> None:
        if self.quiet:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(description or stage, total=total)
        self.progress.update(
            self.tasks[stage],
            completed=completed,
            total=total,
            advance=advance,
            description=description,
        )


@app.command()
def info(
    model: ModelOpt = "embedded",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    allow_pickle: PickleOpt = False,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """List the model's attention layers and heads (self, cross or joint attention; query grid; keys)."""
    _threads(threads)
    from diffcircuit.instrument.registry import HeadRegistry
    from diffcircuit.instrument.session import probe_registry
    from diffcircuit.models.spec import ModelSpec

    spec = ModelSpec(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
    )
    den, text_unknown = _info_model(spec)
    note = None
    try:
        registry = probe_registry(den)
    except (
        DiffcircuitError
    ) as exc:  # an attention processor diffcircuit does not reproduce: listed, not measured
        registry, note = HeadRegistry.from_model(den.network), str(exc)
    if (
        text_unknown
    ):  # probed with a placeholder prompt: the text keys' count is the prompt's, unknown here
        registry = HeadRegistry.from_model(
            den.network,
            geometry={
                i.layer: (i.query_grid, None if i.kind == "cross" else i.n_keys)
                for i in registry.layers
            },
        )
        note = "no prompt given: cross-attention keys are the prompt's tokens (give --prompt-embeds to count them)"
    if as_json:
        print(
            json.dumps(
                {
                    "model_path": str(den.model_path),
                    "class": type(den.network).__name__,
                    "conditioning": den.conditioning.description if den.conditioning else None,
                    "process": den.process,
                    "latent": den.codec is not None,
                    "image_size": den.image_size,
                    "layers": [i.to_dict() for i in registry.layers],
                    "note": note,
                }
            )
        )
        return
    table = Table(title=f"{type(den.network).__name__} from {den.model_path}")
    for col in ("layer", "kind", "heads", "head_dim", "query grid", "keys"):
        table.add_column(col)
    for i in registry.layers:
        grid = "x".join(map(str, i.query_grid)) if i.query_grid else "-"
        table.add_row(i.layer, i.kind, str(i.heads), str(i.head_dim), grid, str(i.n_keys))
    Console().print(table)
    Console().print(
        f"{len(registry)} heads in {len(registry.layers)} attention layers"
        + (f"; geometry unknown: {note}" if note else "")
    )


def _info_model(spec):
    """``(denoiser, text keys unknown)``: listing layers needs no prompt, so a text-conditioned network that has no
    encoder to make one (a pipeline's unet/ alone) is probed with a one-token placeholder instead of refused."""
    from dataclasses import replace

    from diffcircuit.models.loading import load_denoiser
    from diffcircuit.models.needs import placeholder_text

    try:
        return spec.load(), False
    except DiffcircuitError:
        if (
            spec.prompt is not None
            or spec.prompt_embeds is not None
            or spec.class_label is not None
        ):
            raise
        den = load_denoiser(spec.model, allow_pickle=spec.allow_pickle, device=spec.torch_device)
        placeholder = placeholder_text(den.network)
        if placeholder is None:
            raise
        return replace(den, conditioning=placeholder), True


def _headline(summary) -> Table:
    """The console's headline table from a ``Summary``."""
    entropy = {(e["dataset"], e["timestep"]): e["entropy_norm"]["mean"] for e in summary.entropy}
    table = Table(title="diffcircuit: denoising and attention entropy (means over images)")
    for col in (
        "dataset",
        "t",
        "ε-MSE",
        "ε-MSE trivial",
        "x₀-MSE",
        "x₀-MSE trivial",
        "entropy / ln keys",
    ):
        table.add_column(col, justify="right", overflow="fold")  # narrow terminals: wrap, never cut
    for d in summary.denoising:
        spec = summary.datasets[d["dataset"]]["spec"]
        table.add_row(
            spec,
            str(d["timestep"]),
            f"{d['eps_mse']['mean']:.4g}",
            f"{d['eps_mse_trivial']['mean']:.4g}",
            f"{d['x0_mse']['mean']:.4g}",
            f"{d['x0_mse_trivial']['mean']:.4g}",
            f"{entropy[(d['dataset'], d['timestep'])]:.3f}",
        )
    return table


def _interval_text(est, low, high, withheld, p, floor, can_reject) -> str:
    ci = f"no interval ({withheld})" if low is None else f"[{low:.4g}, {high:.4g}]"
    flag = "" if can_reject else f", cannot reach p < 0.05 at this n (smallest p {floor:.2g})"
    return f"{est:.4g} {ci}, p = {p:.3g}{flag}"


def _claim_lines(summary) -> list[str]:
    """The headline divergence and complexity per timestep of a ``Summary``, each with its interval and flags."""
    excluded = set((summary.paper_comparison or {}).get("excluded_timesteps", []))

    def flag(t) -> str:
        return " [uninformative timestep: not a headline claim]" if int(t) in excluded else ""

    lines = [
        f"entropy b − a (mean over heads, nats), t = {d['timestep']}: "
        + _interval_text(
            d["entropy_diff_nats"],
            d["ci_low_nats"],
            d["ci_high_nats"],
            d["ci_withheld"],
            d["p_value"],
            d["p_floor"],
            d["can_reject"],
        )
        + f"; {d['n_heads_differ']}/{d['n_heads']} heads differ"
        + flag(d["timestep"])
        for d in summary.entropy_divergence
    ]
    ratio = summary.complexity_ratio
    for r in (ratio or {}).get("per_timestep", []):
        mde = "unknown" if r["mde_ratio"] is None else f"{r['mde_ratio']:.3g}"
        lines.append(
            f"complexity {ratio['measure']}{' (stand-in)' if ratio['stand_in_for'] else ''}, t = {r['timestep']}: "
            + _interval_text(
                r["value"],
                r["ci_low"],
                r["ci_high"],
                r["ci_withheld"],
                r["p_value"],
                r["p_floor"],
                r["can_reject"],
            )
            + f"; smallest detectable ratio {mde}"
            + (
                " (not the paper's measure)"
                if ratio["stand_in_for"]
                else f" (underpowered vs the paper's {ratio['paper_ratio']})"
                if r["underpowered"]
                else ""
            )
            + flag(r["timestep"])
        )
    return lines


# `run` takes one flag per RunConfig field, made from the field's type, default and line of help (FIELD_HELP), so
# that the command line, the config file and the dataclass cannot drift apart
_RUN_FLAGS = {"ray_address": "--address"}


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _field_option(name: str, hint, default, help_text: str) -> inspect.Parameter:
    """A keyword parameter whose typer option sets config field ``name`` (None: not given on the command line)."""
    import types
    import typing

    inner = (
        [h for h in typing.get_args(hint) if h is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else [hint]
    )
    base = inner[0]
    flag = _RUN_FLAGS.get(name, "--" + name.replace("_", "-"))
    kind = base if base in (bool, int, float, str) else str  # lists: comma-separated text
    decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
    option = typer.Option(*decls, help=f"{help_text} [{_default_text(default)}]")
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )  # noqa: UP007 - typer reads Optional


def _run_parameters() -> list[inspect.Parameter]:
    import typing
    from dataclasses import fields

    from diffcircuit.protocol.config import FIELD_HELP, RunConfig

    hints, defaults = typing.get_type_hints(RunConfig), RunConfig()
    out = inspect.Parameter(
        "out",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    )
    config = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option("--config", help="YAML config (see init-config); flags override it."),
        ],
    )  # noqa: UP007
    quiet = inspect.Parameter(
        "quiet",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--quiet", help="No progress bars or table.")],
    )
    return [
        out,
        config,
        *(
            _field_option(f.name, hints[f.name], getattr(defaults, f.name), FIELD_HELP[f.name])
            for f in fields(RunConfig)
        ),
        quiet,
    ]


def run(*, out: Path, config: Path | None = None, quiet: bool = False, **flags) -> None:
    """Run the protocol on two datasets; write tables, summary and report. Defaults: see init-config."""
    import diffcircuit
    from diffcircuit.protocol.config import RunConfig, load_config_file

    values = load_config_file(config) if config is not None else {}
    cfg = RunConfig.from_mapping(
        values, source=str(config or "config")
    )  # validates the file alone first
    cfg = RunConfig.from_mapping(
        values | {k: v for k, v in flags.items() if v is not None}, source="options"
    )
    names = {
        "overall": "overall (ETA from estimated work)",
        "observe": "observing heads",
        "ablate": "ablating",
        "patch": "patching b into a",
        "attribute": "attribution",
        "discover": "circuit discovery",
    }
    with _Bars(quiet) as bars:
        summary = diffcircuit.run(
            out,
            cfg,
            progress=lambda stage, done, total: bars.update(
                stage, completed=done, total=total, description=names.get(stage, stage)
            ),
        ).summary
    if not quiet:
        Console().print(_headline(summary))
        if summary.ablation:
            for level, by_method in summary.ablation["degradation_range_pct"].items():
                text = ", ".join(f"{m} {lo:.1f}% to {hi:.1f}%" for m, (lo, hi) in by_method.items())
                Console().print(f"ablation degradation range ({level}): {text}")
        if summary.uninformative:
            pairs = ", ".join(f"{d['dataset']} t={d['timestep']}" for d in summary.uninformative)
            Console().print(
                f"uninformative (the model does not beat the trivial predictor; left out of the headline): {pairs}"
            )
        for line in _claim_lines(summary):
            Console().print(line, highlight=False)
        Console().print(f"wrote {out}/summary.json, {out}/report.html and tables/")


run.__signature__ = inspect.Signature(_run_parameters())  # type: ignore[attr-defined]
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command("run")(run)


@app.command("init-config")
def init_config(
    path: Annotated[Path, typer.Argument(help="Where to write the commented default config.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    preset: Annotated[
        str,
        typer.Option(
            "--preset", help="'demo' (the defaults) or 'paper' (2,000 images, 10 timesteps, GPU)."
        ),
    ] = "demo",
) -> None:
    """Write a commented YAML config with every key at its default (or a preset's values)."""
    from diffcircuit.protocol.config import default_config_yaml

    if path.exists() and not force:
        raise DiffcircuitError(f"{path} exists; pass --force to overwrite it")
    text = default_config_yaml(preset)
    path.write_text(text)
    Console().print(f"wrote {path}")


def _window(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    from diffcircuit.protocol.config import parse_timesteps

    bounds = parse_timesteps(text)
    if len(bounds) != 2:
        raise DiffcircuitError(f"--window takes two timesteps LO,HI, not {text!r}")
    return bounds[0], bounds[1]


@app.command()
def ablate(
    out: Annotated[Path, typer.Option("--out", help="Directory for tables/ablations.parquet.")],
    target: Annotated[
        list[str],
        typer.Option(
            "--target",
            help="Head address, layer, block, ResNet block, or prompt token "
            "token:J (token:J*W reweights it; @LAYER[:HEAD] only there) (repeatable).",
        ),
    ] = [],  # noqa: B006
    level: Annotated[
        list[str],
        typer.Option(
            "--level",
            help="Ablate every target of: head, layer, block, resnet, token (repeatable).",
        ),
    ] = [],  # noqa: B006
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated: zero, mean, resample, noise.")
    ] = "zero",
    mean_reference: Annotated[
        str,
        typer.Option(
            "--mean-reference",
            help="Mean/noise ablation's reference: heldout (default: the n images after the evaluated ones) or insample.",
        ),
    ] = "heldout",
    model: ModelOpt = "embedded",
    data: Annotated[
        str, typer.Option("--data", help="'synthetic', 'faces', 'nonfaces' or an image folder.")
    ] = "faces",
    n: Annotated[int, typer.Option("--n")] = 16,
    timesteps: Annotated[str, typer.Option("--timesteps")] = "500",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 50,
    token_weight: Annotated[
        float,
        typer.Option(
            "--token-weight",
            help="With --level token: multiply each token's "
            "attention by W and renormalise (0 removes it).",
        ),
    ] = 0.0,
    sample: Annotated[
        int,
        typer.Option("--sample", help="Also sample N images (DDIM) with each target zero-ablated."),
    ] = 0,
    guidance: GuidanceOpt = 1.0,
    sample_steps: Annotated[int, typer.Option("--sample-steps")] = 50,
    window: Annotated[
        str | None, typer.Option("--window", help="Ablate only at sampling timesteps LO,HI.")
    ] = None,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Ablate chosen heads, layers, blocks, ResNet blocks or prompt tokens and measure the paired degradation."""
    _threads(threads)
    from diffcircuit.commands.ablate import AblateConfig, run_ablations
    from diffcircuit.protocol.config import parse_timesteps

    cfg = AblateConfig(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
        data=data,
        n=n,
        timesteps=parse_timesteps(timesteps),
        seed=seed,
        batch_size=batch_size,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        mean_reference=mean_reference,
        names=tuple(target),
        levels=tuple(level),
        token_weight=token_weight,
        sample=sample,
        sample_steps=sample_steps,
        window=_window(window),
        guidance=guidance,
    )
    with _Bars(quiet) as bars:
        table = run_ablations(
            cfg,
            out,
            progress=lambda k: bars.update(
                "ablate", advance=k, description="ablating", total=cfg.n * len(cfg.timesteps)
            ),
        )
    if not quiet:
        means = table.groupby(["level", "target", "method", "timestep"], sort=False)[
            ["degradation_pct"]
        ].mean()
        result = Table(title="mean degradation of ε-MSE (%)")
        for col in ("level", "target", "method", "t", "Δ%"):
            result.add_column(col)
        for (lv, name, method, t), row in means.iterrows():
            result.add_row(lv, name, method, str(t), f"{row.degradation_pct:.2f}")
        Console().print(result)


@app.command()
def discover(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for circuits/, tables/ and figures/.")
    ],
    model: ModelOpt = "embedded",
    data_a: Annotated[
        str, typer.Option("--data-a", help="'synthetic', 'faces', 'nonfaces' or an image folder.")
    ] = "synthetic",
    data_b: Annotated[
        str,
        typer.Option("--data-b", help="Second distribution, or 'none' for one distribution only."),
    ] = "faces",
    n: Annotated[int, typer.Option("--n", help="Images per distribution.")] = 16,
    timesteps: Annotated[str, typer.Option("--timesteps")] = "100,500,900",
    window: Annotated[
        list[str],
        typer.Option(
            "--window",
            help="Timesteps pooled into one window, e.g. 100,300 (repeatable; default: each timestep alone).",
        ),
    ] = [],  # noqa: B006
    ranking: Annotated[
        str,
        typer.Option(
            "--ranking",
            help="'attribution' (gradients, fast) or 'exhaustive' (one forward per head).",
        ),
    ] = "attribution",
    probes: Annotated[
        int | None,
        typer.Option(
            "--probes",
            help="Gauss-Newton probes of the attribution ranking (default 1; 0 with --ig-steps).",
        ),
    ] = None,
    ig_steps: Annotated[
        int,
        typer.Option(
            "--ig-steps",
            help="Integrated-gradient steps of the attribution ranking (0: first order).",
        ),
    ] = 0,
    taus: Annotated[
        str,
        typer.Option(
            "--taus",
            help="Comma-separated fractions of the gap L_empty - L_full; must include 0.05.",
        ),
    ] = "0.02,0.05,0.1",
    circuit_metric: Annotated[
        str,
        typer.Option(
            "--circuit-metric",
            help="'eps' (ε-MSE) or 'output' (distance to the full model's ε̂, as ACDC).",
        ),
    ] = "eps",
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples of the images (stability, CIs).")
    ] = 10,
    synthetic_color: Annotated[
        str,
        typer.Option(
            "--synthetic-color",
            help="auto (default: gray when the other set is grayscale), color or gray.",
        ),
    ] = "auto",
    match_histogram: Annotated[
        bool,
        typer.Option(
            "--match-histogram/--no-match-histogram",
            help="Match each synthetic image's luminance histogram to the other set's.",
        ),
    ] = False,
    mean_reference: Annotated[
        str,
        typer.Option(
            "--mean-reference",
            help="Mean ablation's reference: heldout (default: the n images after the evaluated ones), pooled (both sets' held-out) or insample.",
        ),
    ] = "heldout",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 50,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Find minimal circuits (ACDC-style pruning, mean ablation) for one or two distributions."""
    _threads(threads)
    from diffcircuit.commands.discover import DiscoverConfig, run_discovery
    from diffcircuit.protocol.config import parse_timesteps
    from diffcircuit.report.figures import circuit_curves_plot, circuit_map, save_figure

    try:
        tau_values = tuple(float(x) for x in taus.split(",") if x.strip())
    except ValueError:
        raise DiffcircuitError(f"--taus must be comma-separated numbers, not {taus!r}") from None
    cfg = DiscoverConfig(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        data_a=data_a,
        data_b=None if data_b.lower() == "none" else data_b,
        n=n,
        timesteps=parse_timesteps(timesteps),
        windows=tuple(parse_timesteps(w) for w in window),
        seed=seed,
        batch_size=batch_size,
        ranking=ranking,
        ig_steps=ig_steps,
        taus=tau_values,
        probes=(0 if ig_steps else 1) if probes is None else probes,
        resamples=resamples,
        metric=circuit_metric,
        synthetic_color=synthetic_color,
        match_histogram=match_histogram,
        mean_reference=mean_reference,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
    )
    with _Bars(quiet) as bars:
        result = run_discovery(
            cfg,
            out,
            progress=lambda stage, done, total: bars.update(
                stage, completed=done, total=total, description=stage
            ),
        )
    labelled = [c | {"label": result.labels[c["dataset"]]} for c in result.circuits]
    save_figure(out / "figures" / "circuits.png", circuit_map(labelled, result.roles))
    save_figure(
        out / "figures" / "circuit_curves.png", circuit_curves_plot(result.curves, result.labels)
    )
    if not quiet:
        Console().print(_circuit_table(labelled))
        for c in labelled:
            if not c["claimed"]:
                Console().print(f"{c['label']}, t = {c['window']}: {c['claim']}")
        Console().print(f"wrote {out}/discover.json, circuits/, tables/ and figures/")


def _interval(span, ci) -> str:
    """``[lo, hi]`` for a 95 % interval, ``range lo–hi`` for the bare range of too few replicates."""
    if ci:
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    return "–" if not span else f"range {span[0]:.3g}–{span[1]:.3g}"


def _circuit_table(circuits: list[dict]) -> Table:
    c0 = circuits[0]
    table = Table(
        title=f"circuits (τ = {c0['tau']} of the gap, {c0['method']} ablation, {c0['metric']} loss)"
    )
    for col in (
        "dataset",
        "t",
        "gap [95% CI], p",
        "heads",
        "size range/CI (R)",
        "faithfulness",
        "recovered w/o circuit",
        "necessary",
        "Jaccard",
    ):
        table.add_column(col)
    for c in circuits:
        g, o = c["gap"], c.get("overlap_with_other") or {}
        full = (
            c["loss_full"] / 100 if g["relative"] is not None else 1.0
        )  # the gap in % of L_full where L_full > 0
        unit = "%" if g["relative"] is not None else ""
        gap = (
            f"{g['mean'] / full:+.3g}{unit} [{g['ci_low'] / full:+.3g}, {g['ci_high'] / full:+.3g}], "
            f"p {g['p_value']:.3g}"
        )
        if not c["claimed"]:
            table.add_row(c["label"], c["window"], gap, "no circuit", "–", "–", "–", "–", "–")
            continue
        jac = (
            "–"
            if o.get("jaccard") is None
            else (
                f"{o['jaccard']:.2f} "
                + _interval(
                    [o["range_low"], o["range_high"]] if o["range_low"] is not None else None,
                    [o["ci_low"], o["ci_high"]] if o["ci_low"] is not None else None,
                )
            )
        )
        table.add_row(
            c["label"],
            c["window"],
            gap,
            str(c["size"]),
            f"{_interval(c['size_range'], c['size_ci'])} ({c['resamples']})",
            _num(c["faithfulness"]),
            _num(c["recovered_without_circuit"]),
            f"{c['n_necessary']}/{c['size']}",
            jac,
        )
    return table


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


@app.command()
def generate(
    out: Annotated[
        Path,
        typer.Option("--out", help="The grid, a .png file (metrics go to the same name .json)."),
    ],
    ablate: Annotated[
        str,
        typer.Option(
            "--ablate", help="Comma-separated head addresses, layers, blocks (or one ResNet block)."
        ),
    ],
    method: Annotated[
        str,
        typer.Option("--method", help="zero, mean (over the clean samples at each step) or scale."),
    ] = "zero",
    scale: Annotated[
        float | None,
        typer.Option("--scale", help="With --method scale: multiply the heads' outputs by F."),
    ] = None,
    model: ModelOpt = "embedded",
    n: Annotated[int, typer.Option("--n", help="Samples (columns of the grid).")] = 8,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    window: Annotated[
        str | None, typer.Option("--window", help="Intervene only at timesteps LO,HI.")
    ] = None,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    guidance: GuidanceOpt = 1.0,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Sample the same seeds with and without an intervention and save a side-by-side grid."""
    _threads(threads)
    from diffcircuit.commands.generate import GenerateConfig, run_generate

    names = tuple(a.strip() for a in ablate.split(",") if a.strip())
    cfg = GenerateConfig(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        ablate=names,
        method=method,
        scale=scale,
        n=n,
        steps=steps,
        seed=seed,
        window=_window(window),
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
        guidance=guidance,
    )
    with _Bars(quiet) as bars:
        result = run_generate(
            cfg,
            out,
            progress=lambda k: bars.update(
                "sample", advance=k, total=2 * steps, description="sampling (clean, intervened)"
            ),
        )
    print(
        f"{result.target.name}: pixel MSE {result.metrics.pixel_mse.mean():.4g}, SSIM {result.metrics.ssim.mean():.3f} "
        f"over {n} samples; wrote {out} and {out.with_suffix('.json')}"
    )


@app.command()
def calibrate(
    model: ModelOpt = "embedded",
    data: Annotated[
        str,
        typer.Option(
            "--data", help="One distribution: 'synthetic', 'faces', 'nonfaces' or a folder."
        ),
    ] = "faces",
    n: Annotated[int, typer.Option("--n")] = 100,
    timestep: Annotated[
        int, typer.Option("--timesteps", "--timestep", help="The one timestep to calibrate at.")
    ] = 500,
    splits: Annotated[int, typer.Option("--splits", help="Random half-vs-half splits.")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    ablation: Annotated[
        bool,
        typer.Option(
            "--ablation/--no-ablation",
            help="Also check the ablation measures (the primary one) [on].",
        ),
    ] = True,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Split one distribution in random halves many times; for every complexity measure (the primary first), print
    the false-positive rate and CI coverage with their uncertainty over splits, and a verdict against the nominal rates."""
    _threads(threads)
    from diffcircuit.commands.calibrate import calibrate as run_calibration

    if n < 4 or splits < 1:
        raise DiffcircuitError("--n must be at least 4 and --splits at least 1")
    from diffcircuit.models.spec import ModelSpec

    spec = ModelSpec(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
    )
    res = run_calibration(
        spec, data=data, n=n, timestep=timestep, splits=splits, seed=seed, ablation=ablation
    )
    print(
        f"{res.splits} random splits of {res.n_images} images into halves of {res.measures[0].n_per_half}, t = {timestep}; "
        f"nominal false-positive rate {res.alpha} (tolerated up to {2 * res.alpha:g}), nominal coverage 0.95 (tolerated "
        "down to 0.90); [Clopper-Pearson 95 % intervals over splits]"
    )
    for m in res.measures:
        fp, cov = m.false_positive, m.coverage
        rate = lambda r: (
            "–" if r.n == 0 else f"{r.rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] of {r.n}"
        )  # noqa: E731
        print(
            f"{m.measure}{' (primary)' if m.primary else ''}: false_positive_rate {rate(fp)}: {fp.verdict}; "
            f"coverage {rate(cov)}: {cov.verdict}"
        )
    print(f"verdict: {res.verdict}")


@app.command()
def guidance(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="New directory: conditional/, unconditional/ and guidance.parquet."
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="The conditional branch's prompt.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML run config (see init-config) for everything else."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="A text-conditioned pipeline folder or hub id.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="fp32, or bf16/fp16 autocast for the forwards."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or table.")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Both branches of classifier-free guidance, analysed separately (the prompt, and the empty prompt: the
    unconditional branch), then compared head by head on the same images and noise."""
    _threads(threads)
    from diffcircuit.commands.guidance import run_guidance
    from diffcircuit.protocol.config import RunConfig, load_config_file

    values = load_config_file(config) if config is not None else {}
    values |= {
        k: v
        for k, v in (("model", model), ("device", device), ("precision", precision))
        if v is not None
    }
    cfg = RunConfig.from_mapping(
        values | {"prompt": prompt or None}, source=str(config or "options")
    )
    with _Bars(quiet) as bars:
        table = run_guidance(
            cfg,
            out,
            progress=lambda name, stage, done, total: bars.update(
                f"{name} {stage}", completed=done, total=total, description=f"{name}: {stage}"
            ),
        ).table
    if not quiet:
        top = table.reindex(table.difference.abs().sort_values(ascending=False).index).head(8)
        view = Table(
            title="heads the prompt changes most (normalised entropy, conditional − unconditional)"
        )
        for col in ("dataset", "t", "head", "difference", "95 % CI", "p (BH)"):
            view.add_column(col, justify="right")
        for r in top.itertuples():
            view.add_row(
                r.dataset,
                str(r.timestep),
                f"{r.layer}:{r.head}",
                f"{r.difference:+.4f}",
                f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                f"{r.p_corrected:.3g}",
            )
        Console().print(view)
    Console().print(f"wrote {out}/conditional, {out}/unconditional and {out}/guidance.parquet")


@app.command()
def cache(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="New directory for the cache (safetensors shards + index.json)."
        ),
    ],
    model: ModelOpt = "embedded",
    data: Annotated[
        str, typer.Option("--data", help="'synthetic', 'faces', 'nonfaces' or a folder.")
    ] = "faces",
    n: Annotated[int, typer.Option("--n")] = 16,
    timesteps: Annotated[
        str, typer.Option("--timesteps", help="Comma-separated timesteps.")
    ] = "500",
    layers: Annotated[
        list[str] | None,
        typer.Option("--layer", help="An attention layer (repeatable; default: all)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per forward and per shard file.")
    ] = 50,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    prompt: PromptOpt = None,
    prompt_embeds: PromptEmbedsOpt = None,
    class_label: ClassLabelOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Spill every head's output (before to_out) to disk, batch by batch, as safetensors shards."""
    _threads(threads)
    from diffcircuit.commands.cache import CacheConfig, run_cache
    from diffcircuit.protocol.config import parse_timesteps

    steps = parse_timesteps(timesteps)
    cfg = CacheConfig(
        model=model,
        allow_pickle=allow_pickle,
        device=device,
        precision=precision,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        class_label=class_label,
        data=data,
        n=n,
        timesteps=steps,
        layers=tuple(layers or ()),
        batch_size=batch_size,
        seed=seed,
    )
    with _Bars(quiet) as bars:
        result = run_cache(
            cfg,
            out,
            progress=lambda k: bars.update(
                "cache", advance=k, total=n * len(steps), description="caching head outputs"
            ),
        )
    Console().print(
        f"wrote {sum(len(result.files(t)) for t in steps)} shards of {len(result.layers)} layers to {out}"
    )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")], quiet: QuietOpt = False
) -> None:
    """Rebuild summary.json and report.html from a run directory's tables."""
    from diffcircuit.report import finalize_run

    finalize_run(run_dir)
    if not quiet:
        Console().print(f"wrote {run_dir}/summary.json and {run_dir}/report.html")


@app.command("train-tiny")
def train_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained diffusers pipeline.")],
    steps: Annotated[
        int, typer.Option("--steps")
    ] = 4500,  # TrainConfig's (a test keeps them equal)
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    synthetic_pool: Annotated[
        int, typer.Option("--synthetic-pool", help="Synthetic training images.")
    ] = 10_000,
    init_from: Annotated[
        str | None,
        typer.Option("--init-from", help="Fine-tune from this diffusers folder's weights."),
    ] = None,
    t_min: Annotated[
        int, typer.Option("--t-min", help="Draw training timesteps from t-min..999.")
    ] = 0,
    loss: Annotated[
        str,
        typer.Option("--loss", help="'v' (ε-MSE weighted by 1/ᾱ, default) or 'eps' (plain ε-MSE)."),
    ] = "v",
    prediction: Annotated[
        str,
        typer.Option("--prediction", help="Network output: 'v_prediction' (default) or 'epsilon'."),
    ] = "v_prediction",
    natural_share: Annotated[
        float,
        typer.Option(
            "--natural-share",
            "--faces-share",
            help="Fraction of each batch from the natural pool (photo crops; faces 0-79 with --composition faces80).",
        ),
    ] = 0.2,
    composition: Annotated[
        str,
        typer.Option(
            "--composition",
            help="'disjoint' (default: shapes and photo crops, no analysed image) or 'faces80' (the old recipe: LFW faces 0-79).",
        ),
    ] = "disjoint",
    photo_pool: Annotated[
        int, typer.Option("--photo-pool", help="Photo crops in the natural pool (disjoint).")
    ] = 10_000,
    gray_share: Annotated[
        float,
        typer.Option(
            "--gray-share",
            help="Fraction of synthetic and colour photo images rendered gray (disjoint).",
        ),
    ] = 0.5,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Train the embedded model (DDPM, seeded) and write it with its model card."""
    _threads(threads)
    from diffcircuit.models.tiny import TrainConfig
    from diffcircuit.models.tiny import train_tiny as train

    if loss not in ("v", "eps"):
        raise DiffcircuitError(f"--loss must be 'v' or 'eps', not {loss!r}")
    if prediction not in ("v_prediction", "epsilon"):
        raise DiffcircuitError(
            f"--prediction must be 'v_prediction' or 'epsilon', not {prediction!r}"
        )
    if not 0 <= natural_share <= 1 or not 0 <= gray_share <= 1:
        raise DiffcircuitError(
            f"--natural-share and --gray-share must lie in [0, 1], not {natural_share} and {gray_share}"
        )
    if composition not in ("disjoint", "faces80") or photo_pool < 1:
        raise DiffcircuitError(
            f"--composition must be 'disjoint' or 'faces80' (not {composition!r}) and --photo-pool >= 1"
        )
    if steps < 1 or batch_size < 2 or lr <= 0 or synthetic_pool < 1 or not 0 <= t_min < 1000:
        raise DiffcircuitError(
            "need --steps >= 1, --batch-size >= 2, --lr > 0, --synthetic-pool >= 1, 0 <= --t-min < 1000"
        )
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        synthetic_pool=synthetic_pool,
        warmup_steps=min(200, max(1, steps // 10)),
        init_from=init_from,
        t_min=t_min,
        loss=loss,
        prediction=prediction,
        natural_share=natural_share,
        composition=composition,
        photo_pool=photo_pool,
        gray_share=gray_share,
    )
    with _Bars(quiet) as bars:
        train(
            out,
            cfg,
            progress=lambda step, loss: bars.update(
                "train", completed=step, total=steps, description=f"training (loss {loss:.3g})"
            ),
        )
    Console().print(f"wrote {out} (model card: {out}/README.md)")


# config fields whose flag is not --field-name; the library names fields, only the command line names flags
FLAGS = {
    "names": "--target",
    "levels": "--level",
    "metric": "--circuit-metric",
    "windows": "--window",
    "ray_address": "--address",
}
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)


@contextmanager
def _one_line_warnings():
    """diffcircuit's own warnings (``DiffcircuitWarning``) printed as one line each, not as Python's warning form."""
    import warnings

    from diffcircuit.errors import DiffcircuitWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DiffcircuitWarning):
            print(f"diffcircuit: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and a non-zero exit for every user error."""
    from diffcircuit._threads import threads_restored

    command = typer.main.get_command(app)
    try:
        with threads_restored(), _one_line_warnings():  # --threads holds for this command only
            result = command.main(args=argv, prog_name="diffcircuit", standalone_mode=False)
    except _UsageError as exc:
        print(f"diffcircuit: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except DiffcircuitError as exc:  # config fields named as the flags that set them
        print(f"diffcircuit: error: {exc.with_flags(FLAGS)}", file=sys.stderr)
        return 1
    except (typer.Abort, KeyboardInterrupt):
        result = INTERRUPTED
    except (
        OSError
    ) as exc:  # the file system refused (a full disk, a folder made read-only meanwhile): one line
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"diffcircuit: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if result == INTERRUPTED:  # typer turns Ctrl-C into exit code 130 without a word
        print(
            "diffcircuit: stopped (Ctrl-C). Run the same command again to continue: a run resumes from the shards it "
            "finished; nothing half-written is kept.",
            file=sys.stderr,
        )
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
