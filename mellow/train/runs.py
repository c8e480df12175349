"""Finding the run and the checkpoint a user means. `find_checkpoint` is the one place a checkpoint is chosen
(a checkpoint folder, or a run's latest, best or step-N: for 03_train's --resume and --init-from, 04_eval,
export and ask); `most_recent_run` is the run `03_train --resume` and `04_eval` take when given none: the one
under checkpoints/ whose latest.json (written at every checkpoint) is newest."""

from __future__ import annotations

import time
from pathlib import Path

from mellow.config import Layer, Names, flatten, load, yaml_layer
from mellow.files import read_json
from mellow.settings import RUNS_ROOT, TrainJob, predated, resolved_settings

AMBIGUOUS_SECONDS = 60.0  # two runs saved closer than this: the newest is a guess, so ask


def find_checkpoint(path: Path, which: str = "latest", option: str = "the checkpoint") -> Path:
    """The checkpoint folder `path` is, or the one `which` names in the run folder `path`: latest, best (the
    run's pointers) or step-N. `option` names the setting in errors."""
    if (path / "trainer.json").is_file():
        return path
    which = which.strip()
    if which in ("latest", "best"):
        pointer = path / f"{which}.json"
        if not pointer.is_file():
            raise FileNotFoundError(f"{option} {which}: {path} has no {pointer.name} (no {which} checkpoint yet; "
                                    "train first)")
        checkpoint = path / read_json(pointer)["path"]
    else:
        number = which.removeprefix("step-").lstrip("0") or "0"
        if not number.isdigit():
            raise ValueError(f"{option} {which!r} must be latest, best or step-N (e.g. step-500)")
        checkpoint = path / f"step-{int(number):06d}"
    if not (checkpoint / "trainer.json").is_file():
        found = sorted(p.name for p in path.glob("step-*") if (p / "trainer.json").is_file())
        raise FileNotFoundError(f"{option} {which}: {checkpoint} is not a complete checkpoint; the run has "
                                f"{', '.join(found) or 'none'}")
    return checkpoint


def most_recent_run(flag: str, example: str, root: Path = RUNS_ROOT) -> Path:
    """The run folder under `root` (or one folder deeper) with the newest latest.json. None found, or two
    saved within AMBIGUOUS_SECONDS of each other, is a ValueError naming what was found and `flag` to pass."""
    pointers = [*root.glob("*/latest.json"), *root.glob("*/*/latest.json")] if root.is_dir() else []
    found = sorted(((pointer.stat().st_mtime, pointer.parent) for pointer in pointers), reverse=True)
    if not found:
        raise ValueError(f"no run found: {root.absolute()} holds no run with a checkpoint (latest.json); "
                         f"pass {flag}, e.g. {example}")
    if len(found) > 1 and found[0][0] - found[1][0] < AMBIGUOUS_SECONDS:
        raise ValueError(f"the most recent run is ambiguous: {found[0][1]} ({_when(found[0][0])}) and "
                         f"{found[1][1]} ({_when(found[1][0])}) were saved within a minute of each other; pass "
                         f"{flag} to pick one, e.g. {example}")
    return found[0][1]


def announce(run: Path, what: str, flag: str) -> None:
    """Say which run was picked and how to pick another (once: the console is quiet on ranks other than 0)."""
    from mellow.progress import console

    saved = _when((run / "latest.json").stat().st_mtime)
    console.print(f"{what} the most recent run [bold]{run}[/] (checkpoint saved {saved}); pass {flag} to pick "
                  "another", highlight=False)


def _when(mtime: float) -> str:
    minutes = (time.time() - mtime) / 60
    if minutes < 1:
        return "just now"
    ago = f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h" if minutes < 48 * 60 else \
        f"{minutes / 1440:.0f} days"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(mtime))}, {ago} ago"



def train_settings(command_line: Layer, preset: Path | None, resume: bool) -> TrainJob:
    """03_train's settings, by the one config path: defaults, the run's saved config.yaml (with `resume`), the
    --config preset, then the command line. With `resume` and no run folder given, the most recent run."""
    layers = [*([yaml_layer(preset)] if preset is not None else []), command_line]
    if resume:
        run_dir = _named(layers, "train.run_dir")
        if run_dir is None:  # --resume alone: the most recent run under checkpoints/
            run_dir = most_recent_run("--train.run_dir <run folder>", "uv run stages/03_train.py --resume "
                                      "--train.run_dir checkpoints/<run>")
            announce(run_dir, "resuming", "--train.run_dir <run folder>")
            layers.append(Layer({"train.run_dir": str(run_dir)}, {"train.run_dir": "--resume"}))
        layers = saved_run_layers(Path(run_dir)) + layers
    return load(TrainJob, layers)


def saved_run_layers(run_dir: Path) -> list[Layer]:
    """The settings a run folder's config.yaml gives the run's continuation, each setting it predates at the
    value it had then (mellow.settings.BEFORE_SETTING); none when the folder holds no run yet."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    layer = yaml_layer(saved, "--resume")
    before = predated(resolved_settings(layer.values))
    return [layer, Layer(before, {name: f"{saved} (saved before the setting existed)" for name in before})]


def _named(layers: list[Layer], dotted: str) -> object | None:
    """The value the last of `layers` to name setting `dotted` gives it (a YAML file's sections entered), or None."""
    names, found = Names(TrainJob), None
    for layer in layers:
        for name, value in flatten(layer.values).items():
            if getattr(names.find(name), "dotted", None) == dotted:
                found = value
    return found
