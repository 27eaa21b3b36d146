"""Every command's config-backed options are made from its config dataclass (issue 17): one option per field, with
the field's line of help and its default, so that help, defaults and config cannot drift; the flags fill the fields
with the fields' types. No model runs here: each command's worker is replaced by one that hands back its config."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, fields
from typing import Annotated

import pytest
import typer

import diffcircuit
import diffcircuit.cli as cli
import diffcircuit.cli_options as cli_options
import diffcircuit.commands.ablate
import diffcircuit.commands.cache
import diffcircuit.commands.discover
import diffcircuit.commands.generate
import diffcircuit.commands.guidance
import diffcircuit.models.tiny
from diffcircuit import ModelSpec, RunConfig
from diffcircuit.commands.ablate import ABLATE_HELP, AblateConfig
from diffcircuit.commands.cache import CACHE_HELP, CacheConfig
from diffcircuit.commands.calibrate import CALIBRATE_HELP, CalibrateConfig
from diffcircuit.commands.discover import DISCOVER_HELP, DiscoverConfig
from diffcircuit.commands.generate import GENERATE_HELP, GenerateConfig
from diffcircuit.errors import ConfigError
from diffcircuit.models.spec import MODEL_HELP, config_from_mapping
from diffcircuit.models.tiny import TRAIN_HELP, TrainConfig
from diffcircuit.protocol.config import FIELD_HELP

GUIDANCE_SKIP = tuple(f.name for f in fields(RunConfig) if f.name not in cli.GUIDANCE_FIELDS)

# command: its config class, the help lines of its fields, the fields without a flag, the arguments it needs besides
# config fields (--threads 1: this machine is shared), and the config those arguments alone make
COMMANDS = {
    "info": (ModelSpec, MODEL_HELP, (), ["--threads", "1"], ModelSpec()),
    "run": (RunConfig, FIELD_HELP, (), ["--out", "OUT"], RunConfig()),
    "ablate": (AblateConfig, ABLATE_HELP, (), ["--out", "OUT", "--threads", "1"], AblateConfig()),
    "discover": (
        DiscoverConfig,
        DISCOVER_HELP,
        (),
        ["--out", "OUT", "--threads", "1"],
        DiscoverConfig(),
    ),
    "generate": (
        GenerateConfig,
        GENERATE_HELP,
        (),
        ["--out", "OUT/grid.png", "--ablate", "mid_block", "--threads", "1"],
        GenerateConfig(ablate=("mid_block",)),
    ),
    "calibrate": (CalibrateConfig, CALIBRATE_HELP, (), ["--threads", "1"], CalibrateConfig()),
    "cache": (CacheConfig, CACHE_HELP, (), ["--out", "OUT", "--threads", "1"], CacheConfig()),
    "guidance": (
        RunConfig,
        FIELD_HELP,
        GUIDANCE_SKIP,
        ["--out", "OUT", "--prompt", "a face", "--threads", "1"],
        RunConfig(prompt="a face"),
    ),
    "train-tiny": (
        TrainConfig,
        TRAIN_HELP,
        cli.TRAIN_SKIP,
        ["--out", "OUT", "--threads", "1"],
        TrainConfig(),
    ),
}


class Handed(Exception):
    """Raised by a stand-in worker: the config the command built."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg


@pytest.fixture
def handed(monkeypatch):
    """Every command's worker replaced by one that raises ``Handed(its config)``."""

    def hand(pick):
        def worker(*args, **kwargs):
            raise Handed(pick(*args, **kwargs))

        return worker

    first, second = (lambda *a, **k: a[0]), (lambda *a, **k: a[1])
    monkeypatch.setattr(cli, "_info_model", hand(first))
    monkeypatch.setattr(diffcircuit, "run", hand(second))
    monkeypatch.setattr(diffcircuit.commands.ablate, "run_ablations", hand(first))
    monkeypatch.setattr(diffcircuit.commands.discover, "run_discovery", hand(first))
    monkeypatch.setattr(diffcircuit.commands.generate, "run_generate", hand(first))
    monkeypatch.setattr(diffcircuit.commands.cache, "run_cache", hand(first))
    monkeypatch.setattr(diffcircuit.commands.guidance, "run_guidance", hand(first))
    monkeypatch.setattr(diffcircuit.models.tiny, "train_tiny", hand(second))
    calibrate = importlib.import_module(
        "diffcircuit.commands.calibrate"
    )  # not the package's function
    monkeypatch.setattr(
        calibrate,
        "calibrate",
        hand(lambda spec, progress=None, **settings: CalibrateConfig(**asdict(spec), **settings)),
    )


def _config(command: str, args: list[str], tmp_path):
    """The config ``diffcircuit COMMAND ARGS`` builds (with the command's own required arguments)."""
    own = [a.replace("OUT", str(tmp_path / "out")) for a in COMMANDS[command][3]]
    with pytest.raises(Handed) as got:
        cli.main([command, *own, *args])
    return got.value.cfg


def _flag(field: str) -> str:
    flag = cli_options.FLAGS.get(field, "--" + field.replace("_", "-"))
    return flag if isinstance(flag, str) else flag[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_an_option_with_its_help_line_and_default(command):
    cls, help_lines, skip, _, _ = COMMANDS[command]
    params = {p.name: p for p in typer.main.get_command(cli.app).commands[command].params}
    for f in fields(cls):
        if f.name in skip:  # (guidance's --prompt and --threads are its own options)
            continue
        param = params[f.name]
        assert _flag(f.name) in param.opts, (command, f.name, param.opts)
        assert param.help.startswith(help_lines[f.name]), (command, f.name)
        if not param.required:
            assert param.help.endswith(f"[{cli_options._default_text(f.default)}]"), (
                command,
                f.name,
            )


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flags_resolve_to_the_configs_defaults(command, handed, tmp_path):
    assert _config(command, [], tmp_path) == COMMANDS[command][4]


@pytest.mark.parametrize(
    "command, args, expected",
    [
        (
            "ablate",
            [
                *("--methods", "zero,mean", "--window", "100,200", "--timesteps", "100,900"),
                *("--target", "mid_block.attentions.0:1", "--target", "mid_block"),
                *("--level", "head", "--token-weight", "0.5", "--no-allow-pickle"),
            ],
            dict(
                methods=("zero", "mean"),
                window=(100, 200),
                timesteps=(100, 900),
                names=("mid_block.attentions.0:1", "mid_block"),
                levels=("head",),
                token_weight=0.5,
                allow_pickle=False,
            ),
        ),
        (
            "discover",
            [
                *("--window", "100,500", "--window", "900", "--taus", "0.05,0.2"),
                *("--data-b", "none", "--circuit-metric", "output", "--ig-steps", "2"),
                "--match-histogram",
            ],
            dict(
                windows=((100, 500), (900,)),
                taus=(0.05, 0.2),
                data_b=None,
                metric="output",
                ig_steps=2,
                probes=0,  # integrated gradients replace the probes unless --probes is given
                match_histogram=True,
            ),
        ),
        ("calibrate", ["--timestep", "100", "--no-ablation"], dict(timestep=100, ablation=False)),
        ("calibrate", ["--timesteps", "900", "--n", "8"], dict(timestep=900, n=8)),
        (
            "cache",
            ["--layer", "a", "--layer", "b", "--timesteps", "100,900", "--class-label", "3"],
            dict(layers=("a", "b"), timesteps=(100, 900), class_label=3),
        ),
        (
            "generate",
            ["--ablate", "a,b", "--window", "0,500", "--method", "scale", "--scale", "2"],
            dict(ablate=("a", "b"), window=(0, 500), method="scale", scale=2.0),
        ),
        (
            "train-tiny",
            ["--faces-share", "0.3", "--steps", "20", "--init-from", "m"],
            dict(natural_share=0.3, steps=20, warmup_steps=2, init_from="m"),
        ),
        (
            "run",
            ["--address", "ray://h:1", "--analyses", "none", "--no-captions"],
            dict(ray_address="ray://h:1", analyses=(), captions=False),
        ),
        ("info", ["--allow-pickle", "--prompt", "a cat"], dict(allow_pickle=True, prompt="a cat")),
        ("guidance", ["--model", "m", "--device", "cpu"], dict(model="m", device="cpu")),
    ],
)
def test_flags_set_their_fields_with_the_fields_types(command, args, expected, handed, tmp_path):
    cfg = _config(command, args, tmp_path)
    got = {name: getattr(cfg, name) for name in expected}
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("ablate", ["--window", "1,2,3"], "--window must be two comma-separated integers LO,HI"),
        ("ablate", ["--methods", "zero,,mean"], "--methods must be a comma-separated list"),
        ("ablate", ["--methods", "blur"], "--methods must be among"),
        ("discover", ["--taus", "a,b"], "--taus must be comma-separated numbers"),
        ("discover", ["--window", "100,x"], "--window must be groups of comma-separated"),
        ("calibrate", ["--n", "2"], "--n must be at least 4 and --splits at least 1"),
        ("cache", ["--timesteps", "1,x"], "--timesteps must be comma-separated integers"),
        ("generate", ["--window", "9,1"], "--window LO,HI needs LO <= HI"),
        ("train-tiny", ["--loss", "x"], "--loss must be 'v' or 'eps'"),
        ("train-tiny", ["--steps", "0"], "need --steps >= 1, --batch-size >= 2"),
        (
            "train-tiny",
            ["--natural-share", "2"],
            "--natural-share and --gray-share must lie in [0, 1]",
        ),
        ("run", ["--timesteps", "1,x"], "--timesteps must be comma-separated integers"),
        ("run", ["--circuit-taus", "0.1,y"], "--circuit-taus must be comma-separated numbers"),
        ("ablate", ["--n", "abc"], "Invalid value for '--n'"),
    ],
)
def test_bad_values_give_one_line_naming_the_flag(command, args, message, handed, tmp_path, capsys):
    own = [a.replace("OUT", str(tmp_path / "out")) for a in COMMANDS[command][3]]
    code = cli.main([command, *own, *args])
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@dataclass(frozen=True, kw_only=True)
class Toy:
    n: int = 3
    names: tuple[str, ...] = ()
    window: tuple[int, int] | None = None
    windows: tuple[tuple[int, ...], ...] = ()
    rate: float = 0.5
    on: bool = True


TOY_HELP = {f.name: f"the {f.name}" for f in fields(Toy)}


def test_config_parameters_make_one_keyword_option_per_field():
    out = inspect.Parameter(
        "out", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, typer.Option("--out")]
    )
    params = cli_options.config_parameters(
        Toy,
        TOY_HELP,
        flags={"names": "--target", "rate": ("--rate", "--share")},
        skip=("windows",),
        repeatable=("names",),
        required=("n",),
        extra_before=[out],
    )
    assert [p.name for p in params] == ["out", "n", "names", "window", "rate", "on"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params)
    assert params[1].default is params[1].empty and all(p.default is None for p in params[2:])

    def command(**flags):
        raise Handed(flags)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    app = typer.Typer(add_completion=False)
    app.command()(command)
    options = {p.name: p for p in typer.main.get_command(app).params}
    assert {name: (*o.opts, *o.secondary_opts) for name, o in options.items()} == {
        "out": ("--out",),
        "n": ("--n",),
        "names": ("--target",),
        "window": ("--window",),
        "rate": ("--rate", "--share"),
        "on": ("--on", "--no-on"),
    }
    assert options["names"].multiple and options["n"].required and not options["rate"].required
    assert {name: o.help for name, o in options.items() if name != "out"} == {
        "n": "the n",  # required: no default to show
        "names": "the names [none]",
        "window": "the window [none]",
        "rate": "the rate [0.5]",
        "on": "the on [on]",
    }
    with pytest.raises(Handed) as got:
        typer.main.get_command(app).main(
            ["--out", "o", "--n", "1", "--target", "a", "--target", "b", "--share", "2"],
            standalone_mode=False,
        )
    assert got.value.cfg == {
        "out": "o",
        "n": 1,
        "names": ["a", "b"],
        "window": None,
        "rate": 2.0,
        "on": None,
    }


def test_config_from_mapping_turns_text_into_the_fields_types():
    cfg = config_from_mapping(
        Toy, {"names": ["a", "b"], "window": "1,2", "windows": ["1,2", "3"], "rate": 1}
    )
    assert cfg == Toy(names=("a", "b"), window=(1, 2), windows=((1, 2), (3,)), rate=1.0)
    assert isinstance(cfg.rate, float)
    with pytest.raises(ConfigError) as bad:
        config_from_mapping(Toy, {"window": "1,2,3"}, source=None)
    assert bad.value.fields == ("window",) and str(bad.value).startswith("window must be two")
    with pytest.raises(Exception, match="toy.yaml: 'n' must be an integer"):
        config_from_mapping(Toy, {"n": "many"}, source="toy.yaml")
    with pytest.raises(Exception, match="unknown key 'm'"):
        config_from_mapping(Toy, {"m": 1})
