"""The options several commands share, each declared once, and the rules every option follows:
it defaults to None, so the config's own default applies, and its help shows that default."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from dskd_ray.config import (
    BACKBONES,
    DEMO_CONFIG,
    MAX_IMAGE_SIZE,
    DSKDConfig,
    ScoringOptions,
    check_device,
)
from dskd_ray.errors import ConfigError

DEFAULTS = DSKDConfig()  # the config owns its defaults; options default to None and show them
SCORING = ScoringOptions()
BACKBONE_HELP = " | ".join(BACKBONES)
WEIGHTS_HELP = "imagenet | path or s3:// URI to a state dict"
DEVICE_HELP = "auto | cpu | cuda | cuda:N"
STUDENTS_HELP = "both (DSKD) | se (≈STFPM) | sd (≈RD) | none (with --memory knn)"
MEMORY_HELP = (
    "knn: add the teacher's memory, nearest-neighbour distances to normal patches "
    "(PatchCore-style), to the map | none"
)


def shown(value: object) -> str:
    """A default as the help shows it: 0.005, 0 (not 0.0), resnet18."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def opt(default: object, **options: Any) -> Any:
    """A typer.Option that defaults to None (its owner's default applies) and shows `default`."""
    # Written into the help, not passed as show_default: click prints a string default as
    # "[default: (50)]".
    text = options.pop("help", "")
    return typer.Option(show_default=False, help=f"{text}  [default: {shown(default)}]", **options)


def field_default(cls: type, name: str) -> str:
    """The default of a dataclass field, as the help shows it (the class owns it)."""
    return shown(next(f.default for f in dataclasses.fields(cls) if f.name == name))


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the ones left None take their owner's default."""
    return {k: v for k, v in options.items() if v is not None}


def device_option(value: str) -> str:
    """--device checked as it is parsed: before data is read or Ray starts."""
    try:
        return check_device(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from e


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log more")]
Device = Annotated[str, typer.Option(callback=device_option, help=DEVICE_HELP)]
Model = Annotated[str, typer.Option("--model", "-m", help="Checkpoint (local or s3://)")]

# The model options `train` and `demo` share: each command shows the default of the config it
# starts from (the demo's is smaller and quicker).
_MODEL_OPTIONS: dict[str, tuple[type, dict[str, Any]]] = {
    "image_size": (
        int,
        {"min": 64, "max": MAX_IMAGE_SIZE, "help": "Square input size, a multiple of 32"},
    ),
    "backbone": (str, {"help": BACKBONE_HELP}),
    "students": (str, {"help": STUDENTS_HELP}),
    "memory": (str, {"help": MEMORY_HELP}),
}


def model_option(field: str, config: DSKDConfig) -> Any:
    """The option for config field `field`, showing `config`'s value as its default."""
    kind, options = _MODEL_OPTIONS[field]
    return Annotated[kind | None, opt(getattr(config, field), **options)]


ImageSize = model_option("image_size", DEFAULTS)
Backbone = model_option("backbone", DEFAULTS)
Students = model_option("students", DEFAULTS)
Memory = model_option("memory", DEFAULTS)
DemoImageSize = model_option("image_size", DEMO_CONFIG)
DemoBackbone = model_option("backbone", DEMO_CONFIG)
DemoStudents = model_option("students", DEMO_CONFIG)
DemoMemory = model_option("memory", DEMO_CONFIG)
