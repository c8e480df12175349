"""The `mellow` command line. Each stage script in stages/ runs one of these commands."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import rich.columns
import rich.table
import rich.text
import typer
import typer.rich_utils
import yaml
from rich.markup import escape

from mellow import envfile

try:  # the machine's .env first: it sets the defaults of the settings below (roots, caches, keys)
    envfile.load_env_file()
except (ValueError, OSError, UnicodeDecodeError) as env_error:
    print(f"error: {env_error}", file=sys.stderr)
    sys.exit(2)

from mellow.audio.decode import AudioDecodeError, FfmpegNotFoundError
from mellow.config import build, cli_option, help_table, load_yaml_with_lines, parse_dotted
from mellow.errors import PeerLostError, TooManyFailuresError
from mellow.files import DISK_FULL, DiskFullError, read_json
from mellow.progress import console
from mellow.settings import (
    AlignConfig,
    AskConfig,
    CaptionsConfig,
    DoctorConfig,
    EncoderConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    PrecomputeConfig,
    TextEncoderConfig,
    TrainConfig,
)
from mellow.sources.config import PrepareConfig
from mellow.store.writer import EncoderExpectation, StoreConfig, StoreMismatchError
from mellow.train import runs

try:  # the machine's .env first: it sets the defaults of the settings below (roots, caches, keys)
    envfile.load_env_file()
except (ValueError, OSError, UnicodeDecodeError) as env_error:
    print(f"error: {env_error}", file=sys.stderr)
    sys.exit(2)


def one_line_usage_errors(main, standalone_mode: bool, **arguments):
    """Run a click `main` so that the command line's own mistakes (a number that is not one, an unknown option,
    a missing argument) are one `error:` line naming the option, like every other bad input, and not a usage box."""
    from typer import rich_utils
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer's own click (0.29 vendors it)

    try:
        result = main(standalone_mode=False, **arguments)
    except ClickException as error:
        if not standalone_mode:
            raise
        if isinstance(error, NoArgsIsHelpError):
            rich_utils.rich_format_error(error)  # `mellow` alone: the help, as typer shows it
        else:
            context = getattr(error, "ctx", None)
            where = f" (`{context.command_path} --help` lists the options)" if context is not None else ""
            console.print(f"[bold red]error:[/] {escape(' '.join(error.format_message().split()))}{where}",
                          highlight=False)
        sys.exit(error.exit_code)
    except typer.Abort:
        if not standalone_mode:
            raise
        console.print("aborted")
        sys.exit(1)
    if not standalone_mode:
        return result
    sys.exit(result if isinstance(result, int) else 0)


class OneLineErrorsGroup(typer.core.TyperGroup):
    """mellow's command group: usage mistakes are one line (one_line_usage_errors)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        return one_line_usage_errors(super().main, standalone_mode, args=args, prog_name=prog_name,
                                     complete_var=complete_var, **extra)


class _FoldingTable(rich.table.Table):
    """typer's help tables, with long words folded onto the next line instead of cut with "…" (typer has no
    option for it): a value such as `folder:<manifest.csv|jsonl>` must be readable whole at any width."""

    def add_row(self, *renderables, **kwargs) -> None:
        super().add_row(*renderables, **kwargs)
        for column in self.columns:
            column.overflow = "fold"


def _folding_parameter_help(**kwargs) -> rich.columns.Columns:
    """An option's help as typer makes it (a rich Columns of Text), each Text folding its long words."""
    columns = _typer_parameter_help(**kwargs)
    for item in columns.renderables:
        if isinstance(item, rich.text.Text):
            item.overflow = "fold"
    return columns


_typer_parameter_help = typer.rich_utils._get_parameter_help
typer.rich_utils.Table = _FoldingTable
typer.rich_utils._get_parameter_help = _folding_parameter_help
# the help is as wide as the terminal ($COLUMNS, else the terminal's own width); piped, 100 columns
typer.rich_utils.MAX_WIDTH = typer.rich_utils.MAX_WIDTH or shutil.get_terminal_size((100, 24)).columns

app = typer.Typer(help="mellow: a staged training pipeline for small audio-language models.", cls=OneLineErrorsGroup,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


TRAIN_SECTIONS = {"train": TrainConfig, "model": ModelConfig, "encoder": EncoderExpectation}


def friendly_errors(command):
    """Turn configuration and input errors into one red line and exit code 2, instead of a traceback; too
    many failed clips (the store is written, but not accepted), a lost process of a multi-process run and a
    full disk into exit code 1; Ctrl-C into one line and exit code 130."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C): what was finished is kept, and the same command continues from it", 130)
        except (TooManyFailuresError, PeerLostError, DiskFullError) as error:
            fail(str(error), 1)
        except (ValueError, FileNotFoundError, TimeoutError, FfmpegNotFoundError, StoreMismatchError,
                AudioDecodeError) as error:
            fail(str(error), 2)
        except OSError as error:
            if error.errno not in DISK_FULL:
                raise
            # a write mellow does not measure itself (e.g. a library's cache): at least the folder and the fix
            where = f" writing {error.filename}" if error.filename else ""
            fail(f"no space left on the device{where} ({error}); free some space and run the same command again", 1)
    return wrapper


def needs(what: str, example: str, script: str) -> str:
    """The message of a stage run without what it needs: what, an example command, the datasets and stores
    that are here, and where every option is listed."""
    datasets = sorted(str(p.parent) for p in Path("datasets").glob("*/prepare.json"))
    stores = sorted(str(p.parent) for p in Path("shards").glob("*/*/meta.json"))
    here = "".join(f"; {kind} here: {', '.join(found[:5])}" for kind, found in (("datasets", datasets),
                                                                                ("stores", stores)) if found)
    return f"{what}, e.g. {example}{here} (`uv run stages/{script} --help` lists every option)"


def fail(message: str, code: int) -> None:
    """Print `message` as the command's error and exit with `code`. Under torchrun, where every process meets
    the same error, only rank 0 prints it (the console is quiet on the others); every failing process also
    writes it to torchrun's error file, so that torchrun's closing report names it as the root cause instead of
    a link about tracebacks."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": f"error: {message}", "timestamp": int(time.time())}))
        except OSError:
            pass  # the report then shows torchrun's default line; the error was printed above
    raise typer.Exit(code=code) from None


@app.command("prepare")
@friendly_errors
def prepare_command(
    source: str = cli_option(PrepareConfig, "source"),
    name: str = cli_option(PrepareConfig, "name"),
    root: Path = cli_option(PrepareConfig, "root"),
    audio_root: Path | None = cli_option(PrepareConfig, "audio_root"),
    num_clips: int = cli_option(PrepareConfig, "num_clips"),
    max_seconds: float = cli_option(PrepareConfig, "max_seconds"),
    seed: int = cli_option(PrepareConfig, "seed"),
    val_fraction: float = cli_option(PrepareConfig, "val_fraction"),
    test_fraction: float = cli_option(PrepareConfig, "test_fraction"),
    comparisons_per_clip: int = cli_option(PrepareConfig, "comparisons_per_clip"),
    columns: str = cli_option(PrepareConfig, "columns"),
    label_field: str = cli_option(PrepareConfig, "label_field"),
    label_task: str = cli_option(PrepareConfig, "label_task"),
    meld_text: bool = cli_option(PrepareConfig, "meld_text"),
    workers: int = cli_option(PrepareConfig, "workers"),
    overwrite: bool = cli_option(PrepareConfig, "overwrite"),
) -> None:
    """Stage 00: write a dataset folder (audio files + manifests) from a source."""
    config = PrepareConfig(**locals())
    from mellow.sources import prepare  # the heavy modules: only once the settings are known to be good

    prepare.run(config)


@app.command("precompute")
@friendly_errors
def precompute_command(
    dataset: Optional[Path] = typer.Argument(None, help="Dataset folder made by 00_prepare (holds audio.jsonl).",
                                             show_default=False),
    encoder: str = cli_option(EncoderConfig, "name", "--encoder"),
    clip_seconds: float = cli_option(EncoderConfig, "clip_seconds"),
    crop: str = cli_option(EncoderConfig, "crop"),
    tokens: int = cli_option(EncoderConfig, "tokens"),
    views: int = cli_option(EncoderConfig, "views"),
    output: str = cli_option(EncoderConfig, "output"),
    pooling: str = cli_option(EncoderConfig, "pooling"),
    batch_size: int = cli_option(EncoderConfig, "batch_size"),
    device: str = cli_option(EncoderConfig, "device"),
    threads: int = cli_option(EncoderConfig, "threads"),
    store_root: Path = cli_option(StoreConfig, "root", "--store-root"),
    shard_megabytes: int = cli_option(StoreConfig, "shard_megabytes"),
    shard_clips: int = cli_option(StoreConfig, "shard_clips"),
    zstd_level: int = cli_option(StoreConfig, "zstd_level"),
    decode_workers: int = cli_option(PrecomputeConfig, "decode_workers"),
    max_failures: float = cli_option(PrecomputeConfig, "max_failures"),
    min_seconds: float = cli_option(PrecomputeConfig, "min_seconds"),
    rank: int = cli_option(PrecomputeConfig, "rank"),
    world_size: int = cli_option(PrecomputeConfig, "world_size"),
    allow_pipes: bool = cli_option(PrecomputeConfig, "allow_pipes"),
    check_audio: bool = cli_option(PrecomputeConfig, "check_audio"),
) -> None:
    """Stage 01: decode every clip through ffmpeg, run the frozen encoder once, write the embedding store.

    Several processes split the work by whole shards: `torchrun --nproc_per_node=N stages/01_precompute.py`,
    a SLURM job array, or explicit --rank/--world-size; the last one to finish writes the index."""
    if dataset is None:
        raise ValueError(needs("01_precompute needs the dataset folder that 00_prepare wrote",
                               "uv run stages/01_precompute.py datasets/synth --encoder whisper-tiny --tokens 16",
                               "01_precompute.py"))
    config = PrecomputeConfig(
        dataset=dataset,
        encoder=EncoderConfig(name=encoder, clip_seconds=clip_seconds, crop=crop, tokens=tokens, views=views,
                              output=output, pooling=pooling, batch_size=batch_size, device=device, threads=threads),
        store=StoreConfig(root=store_root, shard_megabytes=shard_megabytes, shard_clips=shard_clips,
                          zstd_level=zstd_level),
        decode_workers=decode_workers, max_failures=max_failures, min_seconds=min_seconds, rank=rank,
        world_size=world_size, allow_pipes=allow_pipes, check_audio=check_audio)
    from mellow.encode import precompute

    precompute.run(config)


@app.command("precompute-captions")
@friendly_errors
def precompute_captions_command(
    dataset: Optional[Path] = typer.Argument(None, help="Dataset folder made by 00_prepare (with caption "
                                                        "examples).", show_default=False),
    text_encoder: str = cli_option(TextEncoderConfig, "name", "--text-encoder"),
    batch_size: int = cli_option(TextEncoderConfig, "batch_size"),
    device: str = cli_option(TextEncoderConfig, "device"),
    store_root: Path = cli_option(StoreConfig, "root", "--store-root"),
    shard_megabytes: int = cli_option(StoreConfig, "shard_megabytes"),
    shard_clips: int = cli_option(StoreConfig, "shard_clips"),
    max_failures: float = cli_option(CaptionsConfig, "max_failures"),
    rank: int = cli_option(CaptionsConfig, "rank"),
    world_size: int = cli_option(CaptionsConfig, "world_size"),
) -> None:
    """Stage 01 for text: embed every caption once with a sentence encoder, into a store like the audio one.

    02_align reads it. One row per (clip, caption); the same shards, resume, growth and rank split as audio."""
    if dataset is None:
        raise ValueError(needs("01_precompute_captions needs the dataset folder that 00_prepare wrote (its caption "
                               "examples are encoded)", "uv run stages/01_precompute_captions.py datasets/synth",
                               "01_precompute_captions.py"))
    config = CaptionsConfig(
        dataset=dataset, encoder=TextEncoderConfig(name=text_encoder, batch_size=batch_size, device=device),
        store=StoreConfig(root=store_root, shard_megabytes=shard_megabytes, shard_clips=shard_clips),
        max_failures=max_failures, rank=rank, world_size=world_size)
    from mellow.encode import captions

    captions.run(config)


def load_train_configs(config_file: Path | None, overrides: list[str],
                       resume: bool = False) -> tuple[TrainConfig, ModelConfig, EncoderExpectation]:
    """YAML sections (train:, model:, encoder:) overlaid with dotted CLI overrides, validated. With `resume`,
    the run's own saved config.yaml comes first, so only what is given explicitly differs from it."""
    from_file, file_lines = load_yaml_with_lines(config_file) if config_file is not None else ({}, {})
    from_command_line = parse_dotted(overrides)
    for section in from_file:
        if section not in TRAIN_SECTIONS:
            raise ValueError(f"--config {config_file}: unknown section {section!r}; use {', '.join(TRAIN_SECTIONS)}")
    for section in from_command_line:
        if section not in TRAIN_SECTIONS:
            raise ValueError(f"--{section}.*: unknown section; use {', '.join(TRAIN_SECTIONS)}")
    layers = [(from_file, lambda section, key: f"{config_file}:{file_lines.get((section, key), '?')}: "
                                                f"{section}.{key}"),
              (from_command_line, lambda section, key: f"--{section}.{key}")]
    if resume:
        run_dir = {**from_file.get("train", {}), **from_command_line.get("train", {})}.get("run_dir")
        if run_dir is None:  # --resume alone: the most recent run under checkpoints/
            run_dir = runs.most_recent_run("--train.run_dir <run folder>", "uv run stages/03_train.py --resume "
                                           "--train.run_dir checkpoints/<run>")
            runs.announce(run_dir, "resuming", "--train.run_dir <run folder>")
            from_command_line.setdefault("train", {})["run_dir"] = str(run_dir)
        saved = Path(run_dir) / "config.yaml"
        if saved.is_file():
            saved_values, saved_lines = load_yaml_with_lines(saved)
            layers.insert(0, (saved_values, lambda section, key: f"{saved}:{saved_lines.get((section, key), '?')}: "
                                                                 f"{section}.{key}"))
    values: dict[str, dict] = {section: {} for section in TRAIN_SECTIONS}
    names: dict[str, dict[str, str]] = {section: {} for section in TRAIN_SECTIONS}  # where each value was given
    for layer, name in layers:
        for section, entries in layer.items():
            values[section].update(entries or {})
            names[section].update({key: name(section, key) for key in entries or {}})
    return tuple(build(cls, values[section], section, names[section])  # type: ignore[return-value]
                 for section, cls in TRAIN_SECTIONS.items())


@app.command("align")
@friendly_errors
def align_command(
    store: Path = cli_option(AlignConfig, "store"),
    captions: Path = cli_option(AlignConfig, "captions"),
    dataset: Optional[Path] = cli_option(AlignConfig, "dataset"),
    run_dir: Path = cli_option(AlignConfig, "run_dir"),
    decoder: str = cli_option(AlignConfig, "decoder"),
    tiny_hidden: int = cli_option(AlignConfig, "tiny_hidden"),
    updates: int = cli_option(AlignConfig, "updates"),
    batch_size: int = cli_option(AlignConfig, "batch_size"),
    lr: float = cli_option(AlignConfig, "lr"),
    warmup_updates: int = cli_option(AlignConfig, "warmup_updates"),
    weight_decay: float = cli_option(AlignConfig, "weight_decay"),
    temperature: float = cli_option(AlignConfig, "temperature"),
    projector_dropout: float = cli_option(AlignConfig, "projector_dropout"),
    val_every: int = cli_option(AlignConfig, "val_every"),
    eval_split: str = cli_option(AlignConfig, "eval_split"),
    seed: int = cli_option(AlignConfig, "seed"),
    device: str = cli_option(AlignConfig, "device"),
    overwrite: bool = cli_option(AlignConfig, "overwrite"),
) -> None:
    """Stage 02 (optional): warm-start the audio projector by contrastive training against the caption store;
    reports audio-text retrieval. Then: 03_train --train.align_from <run-dir>."""
    if store == Path("") or captions == Path(""):
        raise ValueError(needs("02_align needs the audio store that 01_precompute wrote (--store) and the caption "
                               "store that 01_precompute_captions wrote from the same dataset (--captions)",
                               "uv run stages/01_precompute_captions.py datasets/synth, then uv run "
                               "stages/02_align.py --store shards/synth/<encoder-tag> --captions "
                               "shards/synth/<captions-tag>", "02_align.py"))
    config = AlignConfig(**locals())
    from mellow.train import align

    align.run(config)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Options (--section.name VALUE; also settable in the YAML file):\n\n"
             + help_table(TRAIN_SECTIONS))
@friendly_errors
def train_command(
    context: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with train:, model: and (optional) "
                                                                 "encoder: sections."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --train.run_dir exactly, with its "
                                                         "saved config (options given here may change where "
                                                         "things are and when this invocation stops)."),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", help="Continue the run from this checkpoint: "
                                              "latest, best or step-N (= --resume --train.resume_from); an "
                                              "earlier one branches the run, keeping the newer checkpoints in "
                                              "<run_dir>/branches/."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from the trained weights "
                                             "of this run or checkpoint folder (= --train.init_from)."),
    align_from: Optional[Path] = typer.Option(None, "--align-from", help="Start the audio projector of a new run "
                                              "from a 02_align run folder (= --train.align_from)."),
) -> None:
    """Stage 03: train the projector (+ decoder) from the store. Runs under torchrun for several processes.

    The encoder: section says what the store must be (e.g. --encoder.name whisper-tiny --encoder.tokens 16);
    a store made otherwise is refused, with what differs."""
    resume = resume or resume_from is not None
    overrides = [*context.args, *(["--train.init_from", str(init_from)] if init_from else []),
                 *(["--train.resume_from", resume_from] if resume_from else []),
                 *(["--train.align_from", str(align_from)] if align_from else [])]
    train_config, model_config, expected = load_train_configs(config, overrides, resume)
    if train_config.store == Path(""):
        raise ValueError(needs("03_train needs the audio store that 01_precompute wrote (--train.store)",
                               "uv run stages/03_train.py --train.store shards/synth/<encoder-tag>", "03_train.py"))
    from mellow.train import loop  # torch and transformers: only once the settings are known to be good

    if print_config:
        console.print(yaml.safe_dump(loop.resolved_config(loop.with_dataset(train_config), model_config, expected)))
        return
    result = loop.run(train_config, model_config, resume=resume, expected=expected)
    if result.interrupted:
        raise typer.Exit(130)  # saved; Ctrl-C still ends a chain of commands (`03_train ... && 04_eval ...`)


@app.command("eval")
@friendly_errors
def eval_command(
    run: Optional[Path] = typer.Argument(None, help="A training run folder, or one checkpoint folder inside it "
                                                    "(default: the most recent run under checkpoints/)."),
    which: str = cli_option(EvalConfig, "which"),
    split: str = cli_option(EvalConfig, "split"),
    store: Optional[Path] = cli_option(EvalConfig, "store"),
    dataset: Optional[Path] = cli_option(EvalConfig, "dataset"),
    batch_size: int = cli_option(EvalConfig, "batch_size"),
    max_new_tokens: int = cli_option(EvalConfig, "max_new_tokens"),
    beams: int = cli_option(EvalConfig, "beams"),
    closed: str = cli_option(EvalConfig, "closed"),
    max_examples: int = cli_option(EvalConfig, "max_examples"),
    rescore: bool = cli_option(EvalConfig, "rescore"),
    similarity: bool = cli_option(EvalConfig, "similarity"),
    device: str = cli_option(EvalConfig, "device"),
) -> None:
    """Stage 04: generate answers for a split from the store and score them per task, for every checkpoint of
    a run not scored yet; then the run's leaderboard and report (Markdown + PNG plots) in <run>/eval-<split>/."""
    if run is None:
        run = runs.most_recent_run("a run folder", "uv run stages/04_eval.py checkpoints/<run>")
        runs.announce(run, "scoring", "a run folder (uv run stages/04_eval.py checkpoints/<run>)")
    config = EvalConfig(**locals())
    from mellow.evaluate import score

    score.run(config)


@app.command("leaderboard")
@friendly_errors
def leaderboard_command(
    runs: list[Path] = typer.Argument(..., help="Run folders of a chain's stages, in order: 02_align runs and "
                                                "03_train runs scored by 04_eval."),
    split: str = typer.Option("test", help="The split the training runs were scored on (with --closed rank: "
                                           "<split>-rank)."),
    output: Path = typer.Option(Path("leaderboard"), help="Writes <output>.md and <output>.json."),
) -> None:
    """One leaderboard for a chain of stages (align -> train -> fine-tune): a row per stage with its retrieval
    figures or its newest scored checkpoint's scores, the classification figures of closed-label tasks included."""
    from mellow.evaluate.run_report import write_chain_leaderboard

    rows = write_chain_leaderboard(runs, split, output)
    console.print((output.with_suffix(".md")).read_text(), highlight=False)
    console.print(f"[bold green]leaderboard[/] of {len(rows)} stage(s): {output.with_suffix('.md')}, "
                  f"{output.with_suffix('.json')}")


@app.command("ask")
@friendly_errors
def ask_command(
    inputs: list[str] = typer.Argument(..., metavar="AUDIO1 [AUDIO2] PROMPT",
                                       help="One or two audio files (any format ffmpeg reads), then the prompt."),
    checkpoint: Optional[Path] = cli_option(AskConfig, "checkpoint"),
    model: Optional[Path] = cli_option(AskConfig, "model"),
    which: str = cli_option(AskConfig, "which"),
    beams: int = cli_option(AskConfig, "beams"),
    max_new_tokens: int = cli_option(AskConfig, "max_new_tokens"),
    device: str = cli_option(AskConfig, "device"),
) -> None:
    """Answer a prompt about one or two audio files with a trained checkpoint or an exported model.

    The audio is decoded and encoded on the fly with the encoder and preprocessing of the checkpoint's store
    (checked by fingerprint). Example: mellow ask a.wav b.wav "Which one is louder?" --checkpoint checkpoints/run
    """
    if len(inputs) < 2:
        raise ValueError("give one or two audio files and then the prompt, e.g. mellow ask clip.wav "
                         "\"Describe the audio.\" --checkpoint checkpoints/<run>")
    config = AskConfig(checkpoint=checkpoint, model=model, which=which, beams=beams, max_new_tokens=max_new_tokens,
                       device=device)
    from mellow.evaluate import ask

    answer = ask.ask(config, [Path(path) for path in inputs[:-1]], inputs[-1])
    print(answer)


@app.command("export")
@friendly_errors
def export_command(
    checkpoint: Path = typer.Option(..., help="A training run folder (its latest or best checkpoint) or one "
                                              "checkpoint folder."),
    out: Path = typer.Option(..., help="Folder to write the model to."),
    which: str = cli_option(ExportConfig, "which"),
    overwrite: bool = cli_option(ExportConfig, "overwrite"),
) -> None:
    """Write a checkpoint as a self-contained model folder: the decoder and tokenizer (save_pretrained, LoRA
    merged), the projector (safetensors), the encoder's spec and fingerprint, settings, and a model card with
    its eval scores. `mellow ask --model OUT` runs it; transformers loads OUT/decoder alone."""
    config = ExportConfig(checkpoint=checkpoint, which=which, out=out, overwrite=overwrite)
    from mellow.evaluate import export

    export.export(config)


store_app = typer.Typer(help="Inspect and check embedding stores.", no_args_is_help=True)


app.add_typer(store_app, name="store")


@store_app.command("info")
@friendly_errors
def store_info_command(path: Path = typer.Argument(..., help="A store folder (shards/<dataset>/<tag>).")) -> None:
    """Summarise a store: fingerprint, rows, shards, failed clips, size on disk."""
    from mellow.store.reader import EmbeddingStore

    store = EmbeddingStore(path)
    size = sum(f.stat().st_size for f in (path / "store.zarr").rglob("*") if f.is_file())
    console.print(yaml.safe_dump({"store": str(path), "fingerprint": store.fingerprint,
                                  "rows": store.meta["rows"], "clips_per_shard": store.meta["clips_per_shard"],
                                  "counts": store.meta["counts"], "bytes_on_disk": size,
                                  "bytes_per_clip": round(size / max(store.meta["rows"], 1), 1)},
                                 sort_keys=False), markup=False)


@store_app.command("finalize")
@friendly_errors
def store_finalize_command(
    path: Path = typer.Argument(..., help="A store folder whose shards are all written."),
    max_failures: float = cli_option(PrecomputeConfig, "max_failures"),
) -> None:
    """Write index.jsonl and meta.json once every shard is done (normally the last precompute process does),
    and mark the store complete if no more than --max-failures of its clips failed: this is how a store over its
    failure budget is accepted. Also clears the finalize lock a process killed while finalizing left behind."""
    from mellow.store.writer import FINALIZE_LOCK, StoreWriter, check_failures, finalize_store

    writer = StoreWriter.open_existing(path)
    missing = writer.missing_shards()
    if missing:
        raise ValueError(f"{path}: shards {missing[:10]} are not written yet; run 01_precompute for them first")
    counts = finalize_store(writer, read_json(path / "meta.json").get("dataset", "?"), 0.0, max_failures)
    (path / FINALIZE_LOCK).unlink(missing_ok=True)
    console.print(f"[bold green]finalized[/] {path}: {counts['ok']} clips ok, {counts['failed']} failed")
    check_failures(path, counts, max_failures)


@store_app.command("export-wds")
@friendly_errors
def store_export_command(
    path: Path = typer.Argument(..., help="A finished store folder (shards/<dataset>/<tag>)."),
    out: Path = typer.Argument(..., help="Folder for the tar shards and meta.json."),
    clips_per_tar: int = typer.Option(1000, help="Clips per tar shard."),
) -> None:
    """Export a store as WebDataset tar shards (<key>.npy + <key>.json), readable by stock webdataset."""
    from mellow.store.wds_export import export_webdataset

    export_webdataset(path, out, clips_per_tar)


@store_app.command("verify")
@friendly_errors
def store_verify_command(
    path: Path = typer.Argument(..., help="A store folder (shards/<dataset>/<tag>)."),
    repair: bool = typer.Option(False, help="Take back every damaged shard (its marker and files go, the store is "
                                            "marked incomplete), so that rerunning 01_precompute on its dataset "
                                            "computes it again."),
) -> None:
    """Check that every shard file is there and as long as it was written, every chunk checksum, and the index;
    name the shard and clips of any damage (exit 1 if any)."""
    from mellow.store.integrity import committed_shards, verify_store

    problems = verify_store(path)
    for _, problem in problems:
        console.print(f"[bold red]damaged:[/] {escape(problem)}", highlight=False)
    damaged = sorted({shard for shard, _ in problems if shard is not None})
    if repair and damaged:
        from mellow.store.writer import StoreWriter

        StoreWriter.open_existing(path).uncommit(damaged, "damaged (found by store verify)")
        console.print(f"took back {len(damaged)} shard(s) ({', '.join(map(str, damaged))}): run 01_precompute on "
                      f"{read_json(path / 'meta.json').get('dataset', 'its dataset')} to compute them again")
    if problems:
        raise typer.Exit(code=1)
    shards, total = committed_shards(path)
    if read_json(path / "meta.json").get("complete"):
        console.print(f"[bold green]verified[/] {path}: every shard file, chunk checksum and the index are intact")
    else:
        console.print(f"[bold green]verified[/] {path}: the {len(shards)} committed shard(s) of {total} are "
                      "intact; the store is not finished (rerun 01_precompute to write the rest)")


@app.command("doctor")
@friendly_errors
def doctor_command(
    store_root: Path = cli_option(DoctorConfig, "store_root"),
    checkpoints: Path = cli_option(DoctorConfig, "checkpoints"),
    dataset: Optional[Path] = cli_option(DoctorConfig, "dataset"),
    encoder: str = cli_option(EncoderConfig, "name", "--encoder"),
    tokens: int = cli_option(EncoderConfig, "tokens"),
    views: int = cli_option(EncoderConfig, "views"),
    output: str = cli_option(EncoderConfig, "output"),
) -> None:
    """Check this machine for a mellow job: torch, GPUs and NCCL, ffmpeg, bundled models, rank variables and
    the rendezvous port, SLURM, writable output folders, disk space for a planned store. Prints what is wrong
    and how to fix it; exits 1 if a check failed. Run it where the job will run (inside the sbatch/srun)."""
    config = DoctorConfig(store_root=store_root, checkpoints=checkpoints, dataset=dataset,
                          encoder=EncoderConfig(name=encoder, tokens=tokens, views=views, output=output))
    from mellow import doctor

    if any(check.status == "fail" for check in doctor.run(config)):
        raise typer.Exit(1)


@app.command("quickstart")
@friendly_errors
def quickstart_command(
    root: Path = typer.Option(Path("."), help="Folder under which datasets/, shards/ and checkpoints/ go."),
    encoder: str = typer.Option("whisper-tiny", help="Audio encoder: whisper-tiny, mel, or hf:<dir or org/name>."),
    num_clips: int = typer.Option(800, help="Synthetic clips to generate."),
    updates: int = typer.Option(1600, help="Training updates."),
) -> None:
    """Run prepare -> precompute -> train -> eval on the built-in synthetic set and print the scores."""
    from mellow import quickstart

    quickstart.run(root=root, encoder=encoder, num_clips=num_clips, updates=updates)


def main() -> None:
    app(sys.argv[1:])


def run_stage(command: str) -> None:
    """Entry point of the stage scripts: `stages/03_train.py ARGS` is `mellow train ARGS`, and its usage line
    names the script as typed (`03_train.py [OPTIONS]`), without the subcommand the script does not take."""
    stage = typer.main.get_command(app).commands[command]
    one_line_usage_errors(stage.main, True, args=sys.argv[1:], prog_name=Path(sys.argv[0]).name)


if __name__ == "__main__":
    main()

