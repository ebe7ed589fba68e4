"""Training recipes: YAML files of argument defaults, one per model (training/fit/recipes/).

    python -m training.fit.train --recipe dog_breeds --data DIR --out runs/x --lr 0.01

A recipe's keys are the trainer's flags (``batch-size`` or ``batch_size``); the
recipe sets the defaults and flags given on the command line override them
(timm's train.py does the same). The resolved settings are saved with the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from training.fit.settings import TrainSettings

RECIPES = Path(__file__).resolve().parent / "recipes"


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The recipe's settings as argparse defaults; unknown keys are an error that lists the known."""
    path = Path(path)
    if not path.exists() and (RECIPES / f"{path}.yaml").exists():
        path = RECIPES / f"{path}.yaml"  # a recipe may be named: --recipe dog_breeds
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise FileNotFoundError(f"recipe {path} not found; known recipes: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of flag: value")
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "recipe")}
    settings = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            raise ValueError(
                f"recipe {path}: unknown setting {key!r}; known: "
                + ", ".join(sorted(d.replace("_", "-") for d in dests))
            )
        action = dests[dest]
        takes_list = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)
        if takes_list and value is not None and not isinstance(value, list):
            raise ValueError(f"recipe {path}: {key} takes a list of {action.nargs}, got {value!r}")
        if action.type is not None and value is not None and not isinstance(value, bool):
            value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"recipe {path}: {key} must be one of {sorted(action.choices)}, got {value!r}")
        settings[dest] = value
    return settings


def parse_with_recipe(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``--recipe`` first, make its settings the defaults, then parse everything."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    if known.recipe:
        try:
            parser.set_defaults(**load_recipe(known.recipe, parser))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        # A recipe supplies required flags (--model): they are not required on the command line then.
        for action in parser._actions:
            if action.required and parser.get_default(action.dest) is not None:
                action.required = False
    return parser.parse_args(argv)


def save_settings(cfg: TrainSettings, path: Path) -> None:
    """The resolved settings, as a recipe that reproduces the run."""
    plain = {k.replace("_", "-"): v for k, v in cfg.plain(leave_out=("recipe", "resume", "restart")).items()}
    header = f"# Resolved settings of this run (recipe: {cfg.recipe or 'none'}); usable as --recipe.\n"
    path.write_text(header + yaml.safe_dump(plain, sort_keys=False))
