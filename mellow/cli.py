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
from mellow.config import cli_option
from mellow.errors import PeerLostError, TooManyFailuresError
from mellow.files import DISK_FULL, DiskFullError, read_json
from mellow.options import CONFIG_HELP, MissingSetting, settings, stage
from mellow.progress import console
from mellow.settings import (
    AlignConfig,
    AskConfig,
    CaptionsConfig,
    DoctorConfig,
    EvalConfig,
    ExportConfig,
    PrecomputeConfig,
    QuickstartConfig,
    ServeConfig,
    TrainJob,
    encoder_settings,
)
from mellow.sources.config import PrepareConfig
from mellow.store.writer import StoreMismatchError
from mellow.train import runs


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
    a link about tracebacks. The other ranks wait a moment first: torchrun ends every process once one has failed,
    and a rank 1 that was quicker would end rank 0 before it had printed the error."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.environ.get("RANK", "0") != "0":
        time.sleep(3.0)
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": f"error: {message}", "timestamp": int(time.time())}))
        except OSError:
            pass  # the report then shows torchrun's default line; the error was printed above
    raise typer.Exit(code=code) from None



CONFIG_FILE = typer.Option(None, "--config", help=CONFIG_HELP, show_default=False)


@app.command("prepare", cls=stage(PrepareConfig))
@friendly_errors
def prepare_command(context: typer.Context, config: Optional[Path] = CONFIG_FILE) -> None:
    """Stage 00: write a dataset folder (audio files + manifests) from a source."""
    prepared = settings(context, PrepareConfig, config)
    from mellow.sources import prepare  # the heavy modules: only once the settings are known to be good

    prepare.run(prepared)


@app.command("precompute", cls=stage(PrecomputeConfig, aliases={"encoder": "encoder.name",
                                                                 "store_root": "store.root"}))
@friendly_errors
def precompute_command(
    context: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="Dataset folder made by 00_prepare (holds audio.jsonl); "
                                                        "the same as --dataset.", show_default=False),
    config: Optional[Path] = CONFIG_FILE,
) -> None:
    """Stage 01: decode every clip through ffmpeg, run the frozen encoder once, write the embedding store.

    Several processes split the work by whole shards: `torchrun --nproc_per_node=N stages/01_precompute.py`,
    a SLURM job array, or explicit --rank/--world-size; the last one to finish writes the index."""
    job = settings(context, PrecomputeConfig, config, arguments={"dataset": dataset}, needs=needs(
        "01_precompute needs the dataset folder that 00_prepare wrote",
        "uv run stages/01_precompute.py datasets/synth --encoder whisper-tiny --tokens 16", "01_precompute.py"),
        fixed=like_settings)
    from mellow.encode import precompute

    precompute.run(job)


def like_settings(values: dict[tuple[str, ...], object]) -> tuple[dict[tuple[str, ...], object], str]:
    """The encoder settings `--like` fixes (none without it), and the end of the message for an option that
    contradicts them."""
    like = values.get(("like",))
    if like is None:
        return {}, ""
    from mellow.store.reader import recorded_fingerprint

    fixed = encoder_settings(recorded_fingerprint(Path(like)))
    return ({("encoder", name): value for name, value in fixed.items()},
            f"--like {like}, whose encoder settings this store takes; drop the option, or drop --like to make a store "
            "of other settings")


@app.command("precompute-captions", cls=stage(CaptionsConfig, aliases={"text_encoder": "encoder.name",
                                                                        "store_root": "store.root"}))
@friendly_errors
def precompute_captions_command(
    context: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="Dataset folder made by 00_prepare (with caption "
                                                        "examples); the same as --dataset.", show_default=False),
    config: Optional[Path] = CONFIG_FILE,
) -> None:
    """Stage 01 for text: embed every caption once with a sentence encoder, into a store like the audio one.

    02_align reads it. One row per (clip, caption); the same shards, resume, growth and rank split as audio."""
    job = settings(context, CaptionsConfig, config, arguments={"dataset": dataset}, needs=needs(
        "01_precompute_captions needs the dataset folder that 00_prepare wrote (its caption examples are encoded)",
        "uv run stages/01_precompute_captions.py datasets/synth", "01_precompute_captions.py"))
    from mellow.encode import captions

    captions.run(job)


@app.command("align", cls=stage(AlignConfig))
@friendly_errors
def align_command(context: typer.Context, config: Optional[Path] = CONFIG_FILE) -> None:
    """Stage 02 (optional): warm-start the audio projector by contrastive training against the caption store;
    reports audio-text retrieval. Then: 03_train --train.align_from <run-dir>."""
    aligned = settings(context, AlignConfig, config)
    if aligned.store is None or aligned.captions is None:
        raise ValueError(needs("02_align needs the audio store that 01_precompute wrote (--store) and the caption "
                               "store that 01_precompute_captions wrote from the same dataset (--captions)",
                               "uv run stages/01_precompute_captions.py datasets/synth, then uv run "
                               "stages/02_align.py --store shards/synth/<encoder-tag> --captions "
                               "shards/synth/<captions-tag>", "02_align.py"))
    from mellow.train import align

    align.run(aligned)


@app.command("train", cls=stage(TrainJob))
@friendly_errors
def train_command(
    context: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with train:, model: and (optional) "
                                                                 "encoder: sections; options given on the command "
                                                                 "line win over it.", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --train.run_dir exactly, with its "
                                                         "saved config (options given here may change where "
                                                         "things are and when this invocation stops)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Stage 03: train the projector (+ decoder) from the store. Runs under torchrun for several processes.

    The encoder: section says what the store must be (e.g. --encoder.name whisper-tiny --encoder.tokens 16);
    a store made otherwise is refused, with what differs. --resume-from latest|best|step-N (train.resume_from)
    also resumes."""
    names = context.meta["names"]
    resume = resume or any(getattr(names.find(name), "dotted", None) == "train.checkpoint.resume_from"
                           for name in context.meta["settings"].values)
    job = runs.train_settings(context.meta["settings"], config, resume)
    if job.train.store is None:
        raise ValueError(needs("03_train needs the audio store that 01_precompute wrote (--train.store)",
                               "uv run stages/03_train.py --train.store shards/synth/<encoder-tag>", "03_train.py"))
    from mellow.train import loop  # torch and transformers: only once the settings are known to be good

    if print_config:
        console.print(yaml.safe_dump(loop.resolved_config(loop.with_dataset(job.train), job.model, job.encoder)))
        for line in loop.replan_lines(job.train.run_dir):
            console.print(line, highlight=False)
        return
    result = loop.run(job.train, job.model, resume=resume, expected=job.encoder)
    if result.interrupted:
        raise typer.Exit(130)  # saved; Ctrl-C still ends a chain of commands (`03_train ... && 04_eval ...`)


def settings_or_recent_run(context: typer.Context, cls: type, config: Path | None, name: str, value: Path | None,
                           doing: str, folder: str, command: str):
    """A command's settings whose argument `name` is a run folder; given nowhere, the most recent run under
    checkpoints/, said (`doing` it; pass `folder` to `command` for another)."""
    try:
        return settings(context, cls, config, arguments={name: value}, needs=f"no {name} given")
    except MissingSetting:
        run = runs.most_recent_run("a run folder", f"{command} checkpoints/<run>")
        runs.announce(run, doing, f"{folder} ({command} checkpoints/<run>)")
        return settings(context, cls, config, arguments={name: run})


@app.command("eval", cls=stage(EvalConfig))
@friendly_errors
def eval_command(
    context: typer.Context,
    run: Optional[Path] = typer.Argument(None, help="A training run folder, or one checkpoint folder inside it "
                                                    "(default: the most recent run under checkpoints/); the same "
                                                    "as --run.", show_default=False),
    config: Optional[Path] = CONFIG_FILE,
) -> None:
    """Stage 04: generate answers for a split from the store and score them per task, for every checkpoint of
    a run not scored yet; then the run's leaderboard and report (Markdown + PNG plots) in <run>/eval-<split>/."""
    scoring = settings_or_recent_run(context, EvalConfig, config, "run", run, "scoring", "a run folder",
                                     "uv run stages/04_eval.py")
    from mellow.evaluate import score

    score.run(scoring)


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


@app.command("ask", cls=stage(AskConfig))
@friendly_errors
def ask_command(
    context: typer.Context,
    inputs: Optional[list[str]] = typer.Argument(None, metavar="AUDIO1 [AUDIO2] PROMPT", show_default=False,
                                                 help="One or two audio files (any format ffmpeg reads), then the "
                                                      "prompt."),
    config: Optional[Path] = CONFIG_FILE,
) -> None:
    """Answer a prompt about one or two audio files with a trained checkpoint or an exported model.

    The audio is decoded and encoded on the fly with the encoder and preprocessing of the checkpoint's store
    (checked by fingerprint). Example: mellow ask a.wav b.wav "Which one is louder?" --checkpoint checkpoints/run
    """
    asked = settings(context, AskConfig, config)
    if not inputs or len(inputs) < 2:
        raise ValueError("give one or two audio files and then the prompt, e.g. uv run mellow ask clip.wav "
                         "\"Describe the audio.\" --checkpoint checkpoints/<run>")
    from mellow.evaluate import ask

    answer = ask.ask(asked, [Path(path) for path in inputs[:-1]], inputs[-1])
    print(answer)


@app.command("export", cls=stage(ExportConfig))
@friendly_errors
def export_command(context: typer.Context, config: Optional[Path] = CONFIG_FILE) -> None:
    """Write a checkpoint as a self-contained model folder: the decoder and tokenizer (save_pretrained, LoRA
    merged), the projector (safetensors), the encoder's spec and fingerprint, settings, and a model card with
    its eval scores. `mellow ask --model OUT` runs it; transformers loads OUT/decoder alone."""
    exported = settings(context, ExportConfig, config)
    from mellow.evaluate import export

    export.export(exported)


@app.command("serve", cls=stage(ServeConfig))
@friendly_errors
def serve_command(
    context: typer.Context,
    model: Optional[Path] = typer.Argument(None, help="A training run folder, one checkpoint folder, or a model "
                                                      "folder written by `mellow export` (default: the most recent "
                                                      "run under checkpoints/); the same as --model.",
                                           show_default=False),
    config: Optional[Path] = CONFIG_FILE,
) -> None:
    """Serve a trained model through an OpenAI-compatible API: POST /v1/chat/completions with one or two
    input_audio parts and a text prompt, GET /v1/models, GET /health.

    Concurrent requests are decoded together, each joining at the next step. `uv run mellow serve` serves the
    most recent run (after `mellow quickstart`, its model); docs/serving.md has a client."""
    served = settings_or_recent_run(context, ServeConfig, config, "model", model, "serving",
                                    "a run or exported model folder", "uv run mellow serve")
    from mellow.evaluate import serve

    serve.serve(served)


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


@app.command("doctor", cls=stage(DoctorConfig, aliases={"encoder": "encoder.name"}))
@friendly_errors
def doctor_command(context: typer.Context, config: Optional[Path] = CONFIG_FILE) -> None:
    """Check this machine for a mellow job: torch, GPUs and NCCL, ffmpeg, bundled models, rank variables and
    the rendezvous port, SLURM, writable output folders, disk space for a planned store. Prints what is wrong
    and how to fix it; exits 1 if a check failed. Run it where the job will run (inside the sbatch/srun)."""
    checked = settings(context, DoctorConfig, config)
    from mellow import doctor

    if any(check.status == "fail" for check in doctor.run(checked)):
        raise typer.Exit(1)


@app.command("quickstart", cls=stage(QuickstartConfig))
@friendly_errors
def quickstart_command(context: typer.Context, config: Optional[Path] = CONFIG_FILE) -> None:
    """Run prepare -> precompute -> train -> eval on the built-in synthetic set and print the scores.

    The training run is stages/configs/quickstart.yaml's."""
    chosen = settings(context, QuickstartConfig, config)
    from mellow import quickstart

    quickstart.run(chosen)


def main() -> None:
    app(sys.argv[1:])


def run_stage(command: str) -> None:
    """Entry point of the stage scripts: `stages/03_train.py ARGS` is `mellow train ARGS`, and its usage line
    names the script as typed (`03_train.py [OPTIONS]`), without the subcommand the script does not take."""
    stage = typer.main.get_command(app).commands[command]
    one_line_usage_errors(stage.main, True, args=sys.argv[1:], prog_name=Path(sys.argv[0]).name)


if __name__ == "__main__":
    main()

