"""The ``diffcircuit`` command: parse arguments, build a config, call the Python API, print.

Errors the user can fix (bad arguments, missing files, refused checkpoints) print one line on
stderr and exit non-zero; tracebacks are for bugs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
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

from diffcircuit.commands.ablate import ABLATE_HELP, AblateConfig
from diffcircuit.commands.cache import CACHE_HELP, CacheConfig
from diffcircuit.commands.calibrate import CALIBRATE_HELP, CalibrateConfig
from diffcircuit.commands.discover import DISCOVER_HELP, DiscoverConfig
from diffcircuit.commands.generate import GENERATE_HELP, GenerateConfig
from diffcircuit.errors import DiffcircuitError
from diffcircuit.models.spec import MODEL_HELP, ModelSpec, config_from_mapping
from diffcircuit.models.tiny import TRAIN_HELP, TrainConfig
from diffcircuit.protocol.config import FIELD_HELP, RunConfig

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


# Each command with a config dataclass takes one flag per field, made from the field's type, default and line of
# help (the *_HELP mapping beside the dataclass), so that the command line, the config and its docs cannot drift.
# FLAGS: the fields whose flag is not --field-name (a tuple: the flag, then other spellings it also accepts); the
# library names fields, only the command line names flags (an error's fields are shown as the first spelling)
FLAGS: dict[str, str | tuple[str, ...]] = {
    "names": "--target",
    "levels": "--level",
    "layers": "--layer",
    "metric": "--circuit-metric",
    "windows": "--window",
    "ray_address": "--address",
    "timestep": ("--timesteps", "--timestep"),
    "natural_share": ("--natural-share", "--faces-share"),
}


def _default_text(value) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()


def _field_option(
    name: str,
    hint,
    default,
    help_text: str,
    *,
    flag: str | tuple[str, ...],
    repeatable: bool = False,
    required: bool = False,
) -> inspect.Parameter:
    """A keyword parameter whose typer option sets config field ``name``: None when not given on the command line,
    so that the config's default (or a config file's value) holds. Tuples are comma-separated text, or with
    ``repeatable`` one flag per item."""
    inner = (
        [h for h in typing.get_args(hint) if h is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else [hint]
    )
    kind = inner[0] if inner[0] in (bool, int, float, str) else str
    names = (flag,) if isinstance(flag, str) else flag
    decls = (f"{names[0]}/--no-{names[0][2:]}", *names[1:]) if kind is bool else names
    if required:
        option = typer.Option(*decls, help=help_text)
        annotation: object = Annotated[list[str] if repeatable else kind, option]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    option = typer.Option(*decls, help=f"{help_text} [{_default_text(default)}]")
    annotation = Annotated[(list[str] if repeatable else kind) | None, option]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def config_parameters(
    cls: type,
    help: Mapping[str, str],
    *,
    flags: Mapping[str, str | tuple[str, ...]] = FLAGS,
    skip: Collection[str] = (),
    repeatable: Collection[str] = (),
    required: Collection[str] = (),
    extra_before: Sequence[inspect.Parameter] = (),
    extra_after: Sequence[inspect.Parameter] = (),
) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the config dataclass ``cls`` (but ``skip``): its flag
    (``flags[field]``, else ``--field-name``), its type from the field's hint, and its help: the field's line of
    ``help`` and its default. ``extra_before`` and ``extra_after``: the command's own options around them."""
    hints = typing.get_type_hints(cls)
    return [
        *extra_before,
        *(
            _field_option(
                f.name,
                hints[f.name],
                _field_default(f),
                help[f.name],
                flag=flags.get(f.name, "--" + f.name.replace("_", "-")),
                repeatable=f.name in repeatable,
                required=f.name in required,
            )
            for f in dataclasses.fields(cls)
            if f.name not in skip
        ),
        *extra_after,
    ]


def _config_command(
    name: str, cls: type, help: Mapping[str, str], *, after=("quiet", "threads"), **options
):
    """Register the decorated function as command ``name``: its own keyword parameters (``--out``, ...; those named
    in ``after`` last) and one option per field of ``cls`` (``config_parameters``), which arrive in its
    ``**flags``, None for each one not given."""

    def register(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        params = config_parameters(
            cls,
            help,
            extra_before=[p for p in own if p.name not in after],
            extra_after=[p for p in own if p.name in after],
            **options,
        )
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name)(fn)

    return register


def _given(flags: Mapping[str, object]) -> dict[str, object]:
    """The flags given on the command line (not None), as field -> value for ``config_from_mapping``."""
    return {k: v for k, v in flags.items() if v is not None}


@_config_command("info", ModelSpec, MODEL_HELP)
def info(
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
    **flags,
) -> None:
    """List the model's attention layers and heads (self, cross or joint attention; query grid; keys)."""
    _threads(threads)
    from diffcircuit.instrument.registry import HeadRegistry
    from diffcircuit.instrument.session import probe_registry

    spec = ModelSpec.from_mapping(_given(flags), source=None)
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


@_config_command("run", RunConfig, FIELD_HELP)
def run(
    *,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML config (see init-config); flags override it."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or table.")] = False,
    **flags,
) -> None:
    """Run the protocol on two datasets; write tables, summary and report. Defaults: see init-config."""
    import diffcircuit
    from diffcircuit.protocol.config import RunConfig, load_config_file

    values = load_config_file(config) if config is not None else {}
    cfg = RunConfig.from_mapping(
        values, source=str(config or "config")
    )  # validates the file alone first (its errors name the file and key)
    cfg = RunConfig.from_mapping(
        values | _given(flags), source=None
    )  # so an ill-typed value here is a flag's: its error names the flag
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
    quiet: QuietOpt = False,
) -> None:
    """Write a commented YAML config with every key at its default (or a preset's values)."""
    from diffcircuit.protocol.config import default_config_yaml

    if path.exists() and not force:
        raise DiffcircuitError(f"{path} exists; pass --force to overwrite it")
    text = default_config_yaml(preset)
    path.write_text(text)
    if not quiet:
        Console().print(f"wrote {path}")


@_config_command("ablate", AblateConfig, ABLATE_HELP, repeatable=("names", "levels"))
def ablate(
    *,
    out: Annotated[Path, typer.Option("--out", help="Directory for tables/ablations.parquet.")],
    quiet: QuietOpt = False,
    threads: ThreadsOpt = 0,
    **flags,
) -> None:
    """Ablate chosen heads, layers, blocks, ResNet blocks or prompt tokens and measure the paired degradation."""
    _threads(threads)
    from diffcircuit.commands.ablate import run_ablations

    cfg = AblateConfig.from_mapping(_given(flags), source=None)
    with _Bars(quiet) as bars:
        table = run_ablations(
            cfg,
            out,
            progress=lambda k: bars.update(
                "ablate", advance=k, description="ablating", total=cfg.n * len(cfg.timesteps)
            ),
            sampling_progress=lambda k, total: bars.update(
                "sample", advance=k, description="sampling", total=total
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


@_config_command("discover", DiscoverConfig, DISCOVER_HELP, repeatable=("windows",))
def discover(
    *,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for circuits/, tables/ and figures/.")
    ],
    quiet: QuietOpt = False,
    threads: ThreadsOpt = 0,
    **flags,
) -> None:
    """Find minimal circuits (ACDC-style pruning, mean ablation) for one or two distributions."""
    _threads(threads)
    from diffcircuit.commands.discover import run_discovery
    from diffcircuit.report.figures import circuit_curves_plot, circuit_map, save_figure

    values = _given(flags)
    if str(values.get("data_b", "")).lower() == "none":  # one distribution only
        values["data_b"] = None
    if "probes" not in values and values.get("ig_steps"):  # integrated gradients replace the probes
        values["probes"] = 0
    cfg = DiscoverConfig.from_mapping(values, source=None)
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
        ci = (
            ""
            if g["ci_low"] is None
            else f" [{g['ci_low'] / full:+.3g}, {g['ci_high'] / full:+.3g}]"
        )  # no interval from fewer than MIN_UNITS_FOR_CI images
        gap = f"{g['mean'] / full:+.3g}{unit}{ci}, p {g['p_value']:.3g}"
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


@_config_command("generate", GenerateConfig, GENERATE_HELP, required=("ablate",))
def generate(
    *,
    out: Annotated[
        Path,
        typer.Option("--out", help="The grid, a .png file (metrics go to the same name .json)."),
    ],
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
    **flags,
) -> None:
    """Sample the same seeds with and without an intervention and save a side-by-side grid."""
    _threads(threads)
    from diffcircuit.commands.generate import run_generate

    cfg = GenerateConfig.from_mapping(_given(flags), source=None)
    with _Bars(quiet) as bars:
        result = run_generate(
            cfg,
            out,
            progress=lambda k: bars.update(
                "sample", advance=k, total=2 * cfg.steps, description="sampling (clean, intervened)"
            ),
        )
    print(
        f"{result.target.name}: pixel MSE {result.metrics.pixel_mse.mean():.4g}, SSIM {result.metrics.ssim.mean():.3f} "
        f"over {cfg.n} samples; wrote {out} and {out.with_suffix('.json')}"
    )


@_config_command("calibrate", CalibrateConfig, CALIBRATE_HELP)
def calibrate(*, threads: ThreadsOpt = 0, quiet: QuietOpt = False, **flags) -> None:
    """Split one distribution in random halves many times; for every complexity measure (the primary first), print
    the false-positive rate and CI coverage with their uncertainty over splits, and a verdict against the nominal rates."""
    _threads(threads)
    from diffcircuit.commands.calibrate import calibrate as run_calibration

    cfg = CalibrateConfig.from_mapping(_given(flags), source=None)
    total = cfg.n * (2 if cfg.ablation else 1)  # observed, then ablated
    with _Bars(quiet) as bars:
        res = run_calibration(
            cfg.model_spec,
            **cfg.settings(),
            progress=lambda k: bars.update(
                "calibrate", advance=k, total=total, description="observing, then ablating"
            ),
        )
    print(
        f"{res.splits} random splits of {res.n_images} images into halves of {res.measures[0].n_per_half}, t = {cfg.timestep}; "
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


# guidance runs a whole run config (--config) twice; of its fields, only the model's placement is a flag here, and
# the prompt (required: the conditional branch) is its own option
GUIDANCE_FIELDS = ("model", "device", "precision")


@_config_command(
    "guidance",
    RunConfig,
    FIELD_HELP,
    skip=[f.name for f in dataclasses.fields(RunConfig) if f.name not in GUIDANCE_FIELDS],
)
def guidance(
    *,
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
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or table.")] = False,
    threads: ThreadsOpt = 0,
    **flags,
) -> None:
    """Both branches of classifier-free guidance, analysed separately (the prompt, and the empty prompt: the
    unconditional branch), then compared head by head on the same images and noise."""
    _threads(threads)
    from diffcircuit.commands.guidance import run_guidance
    from diffcircuit.protocol.config import load_config_file

    values = load_config_file(config) if config is not None else {}
    cfg = RunConfig.from_mapping(
        values | _given(flags) | {"prompt": prompt or None}, source=str(config or "options")
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


@_config_command("cache", CacheConfig, CACHE_HELP, repeatable=("layers",))
def cache(
    *,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="New directory for the cache (safetensors shards + index.json)."
        ),
    ],
    threads: ThreadsOpt = 0,
    quiet: QuietOpt = False,
    **flags,
) -> None:
    """Spill every head's output (before to_out) to disk, batch by batch, as safetensors shards."""
    _threads(threads)
    from diffcircuit.commands.cache import run_cache

    cfg = CacheConfig.from_mapping(_given(flags), source=None)
    steps = cfg.timesteps
    with _Bars(quiet) as bars:
        result = run_cache(
            cfg,
            out,
            progress=lambda k: bars.update(
                "cache", advance=k, total=cfg.n * len(steps), description="caching head outputs"
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
    from diffcircuit.protocol.store import claim_directory
    from diffcircuit.report import finalize_run

    if (run_dir / "manifest.json").is_file():
        with claim_directory(run_dir, "report"):  # not while a run or another report writes there
            finalize_run(run_dir)
    else:
        finalize_run(
            run_dir
        )  # not a finished run: it says so in one line (and leaves no lock file)
    if not quiet:
        Console().print(f"wrote {run_dir}/summary.json and {run_dir}/report.html")


# train-tiny's fields without a flag: the warm-up follows --steps (a tenth, at most 200 steps); the others keep the
# recipe the model card records
TRAIN_SKIP = ("warmup_steps", "ema_decay", "log_every", "quality_images", "snapshot_every")


@_config_command("train-tiny", TrainConfig, TRAIN_HELP, skip=TRAIN_SKIP)
def train_tiny(
    *,
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained diffusers pipeline.")],
    quiet: QuietOpt = False,
    threads: ThreadsOpt = 0,
    **flags,
) -> None:
    """Train the embedded model (DDPM, seeded) and write it with its model card."""
    _threads(threads)
    from diffcircuit.models.tiny import train_tiny as train

    values = _given(flags)
    steps = values.get("steps", TrainConfig.steps)
    cfg = config_from_mapping(
        TrainConfig, values | {"warmup_steps": min(200, max(1, steps // 10))}, source=None
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
        shown = {field: flag if isinstance(flag, str) else flag[0] for field, flag in FLAGS.items()}
        print(f"diffcircuit: error: {exc.with_flags(shown)}", file=sys.stderr)
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
        print(f"diffcircuit: stopped (Ctrl-C). {_after_stop(argv)}", file=sys.stderr)
    return result if isinstance(result, int) else 0


def _after_stop(argv: list[str] | None) -> str:
    """What running the stopped command again does: ``run`` resumes from its finished shards; ``cache`` and
    ``guidance`` refuse an existing output directory; the others start over."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "run":
        return (
            "Run the same command again to continue: a run resumes from the shards it finished; nothing "
            "half-written is kept."
        )
    if command in ("cache", "guidance"):
        return (
            "Its output directory is incomplete: remove it (or choose another --out) and run the command "
            "again."
        )
    return "Run the same command again to start it over; nothing half-written is kept."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
