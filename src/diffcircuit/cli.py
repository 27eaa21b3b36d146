"""The ``diffcircuit`` command: parse arguments, build a config, call the Python API, print.

Errors the user can fix (bad arguments, missing files, refused checkpoints) print one line on
stderr and exit non-zero; tracebacks are for bugs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from diffcircuit.cli_options import FLAGS, config_command, given
from diffcircuit.cli_render import Bars, circuit_table, claim_lines, headline_table
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


@config_command(app, "info", ModelSpec, MODEL_HELP)
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

    spec = ModelSpec.from_mapping(given(flags), source=None)
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


@config_command(app, "run", RunConfig, FIELD_HELP)
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
        values | given(flags), source=None
    )  # so an ill-typed value here is a flag's: its error names the flag
    names = {
        "overall": "overall (ETA from estimated work)",
        "observe": "observing heads",
        "ablate": "ablating",
        "patch": "patching b into a",
        "attribute": "attribution",
        "discover": "circuit discovery",
    }
    with Bars(quiet) as bars:
        summary = diffcircuit.run(
            out,
            cfg,
            progress=lambda stage, done, total: bars.update(
                stage, completed=done, total=total, description=names.get(stage, stage)
            ),
        ).summary
    if not quiet:
        Console().print(headline_table(summary))
        if summary.ablation:
            for level, by_method in summary.ablation["degradation_range_pct"].items():
                text = ", ".join(f"{m} {lo:.1f}% to {hi:.1f}%" for m, (lo, hi) in by_method.items())
                Console().print(f"ablation degradation range ({level}): {text}")
        if summary.uninformative:
            pairs = ", ".join(f"{d['dataset']} t={d['timestep']}" for d in summary.uninformative)
            Console().print(
                f"uninformative (the model does not beat the trivial predictor; left out of the headline): {pairs}"
            )
        for line in claim_lines(summary):
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


@config_command(app, "ablate", AblateConfig, ABLATE_HELP, repeatable=("names", "levels"))
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

    cfg = AblateConfig.from_mapping(given(flags), source=None)
    with Bars(quiet) as bars:
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


@config_command(app, "discover", DiscoverConfig, DISCOVER_HELP, repeatable=("windows",))
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

    values = given(flags)
    if str(values.get("data_b", "")).lower() == "none":  # one distribution only
        values["data_b"] = None
    if "probes" not in values and values.get("ig_steps"):  # integrated gradients replace the probes
        values["probes"] = 0
    cfg = DiscoverConfig.from_mapping(values, source=None)
    with Bars(quiet) as bars:
        result = run_discovery(
            cfg,
            out,
            progress=lambda stage, done, total: bars.update(
                stage, completed=done, total=total, description=stage
            ),
        )
    save_figure(
        out / "figures" / "circuits.png", circuit_map(result.circuits, result.roles, result.labels)
    )
    save_figure(
        out / "figures" / "circuit_curves.png", circuit_curves_plot(result.curves, result.labels)
    )
    if not quiet:
        Console().print(circuit_table(result.circuits, result.labels))
        for c in result.circuits:
            if not c.claimed:
                Console().print(f"{result.labels[c.dataset]}, t = {c.window}: {c.claim}")
        Console().print(f"wrote {out}/discover.json, circuits/, tables/ and figures/")


@config_command(app, "generate", GenerateConfig, GENERATE_HELP, required=("ablate",))
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

    cfg = GenerateConfig.from_mapping(given(flags), source=None)
    with Bars(quiet) as bars:
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


@config_command(app, "calibrate", CalibrateConfig, CALIBRATE_HELP)
def calibrate(*, threads: ThreadsOpt = 0, quiet: QuietOpt = False, **flags) -> None:
    """Split one distribution in random halves many times; for every complexity measure (the primary first), print
    the false-positive rate and CI coverage with their uncertainty over splits, and a verdict against the nominal rates."""
    _threads(threads)
    from diffcircuit.commands.calibrate import calibrate as run_calibration

    cfg = CalibrateConfig.from_mapping(given(flags), source=None)
    total = cfg.n * (2 if cfg.ablation else 1)  # observed, then ablated
    with Bars(quiet) as bars:
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


@config_command(
    app,
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
        values | given(flags) | {"prompt": prompt or None}, source=str(config or "options")
    )
    with Bars(quiet) as bars:
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


@config_command(app, "cache", CacheConfig, CACHE_HELP, repeatable=("layers",))
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

    cfg = CacheConfig.from_mapping(given(flags), source=None)
    steps = cfg.timesteps
    with Bars(quiet) as bars:
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


@config_command(app, "train-tiny", TrainConfig, TRAIN_HELP, skip=TRAIN_SKIP)
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

    values = given(flags)
    steps = values.get("steps", TrainConfig.steps)
    cfg = config_from_mapping(
        TrainConfig, values | {"warmup_steps": min(200, max(1, steps // 10))}, source=None
    )
    with Bars(quiet) as bars:
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
