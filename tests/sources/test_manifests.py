"""Manifests are data: a crafted pipe runs nothing, and every malformed line is one error naming file and line."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mellow.cli import app
from mellow.encode import precompute
from mellow.manifests import ManifestError
from mellow.settings import EncoderConfig, PrecomputeConfig
from mellow.store.writer import StoreConfig

from conftest import TINY_ARGS


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    copy = tmp_path / "synth"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


def _config(dataset: Path, root: Path, **extra) -> PrecomputeConfig:
    return PrecomputeConfig(dataset=dataset, encoder=EncoderConfig(name="mel", clip_seconds=3.0, tokens=4),
                            store=StoreConfig(root=root, shard_clips=8), **extra)


def _append(path: Path, *records: object) -> None:
    with open(path, "a") as handle:
        handle.writelines((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)


def test_a_pipe_in_audio_jsonl_runs_nothing_unless_allowed(dataset, tmp_path):
    witness = tmp_path / "pwned"
    lines = (dataset / "audio.jsonl").read_text().count("\n")
    _append(dataset / "audio.jsonl", {"id": "evil", "path": "x.tar#a.wav", "tar": f"pipe:touch {witness}; true",
                                      "member": "a.wav"})
    with pytest.raises(ManifestError, match=rf"audio.jsonl:{lines + 1}: tar 'pipe:touch .*shell command.*"
                                            r"--allow-pipes"):
        precompute.run(_config(dataset, tmp_path / "shards"))
    assert not witness.exists()
    result = CliRunner().invoke(app, ["precompute", str(dataset), "--encoder", "mel", "--store-root",
                                      str(tmp_path / "shards")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "--allow-pipes" in result.output
    assert not witness.exists()


def test_allow_pipes_runs_a_trusted_datasets_pipe(dataset, tmp_path):
    first = json.loads((dataset / "audio.jsonl").read_text().splitlines()[0])
    archive = tmp_path / "clips.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(dataset / first["path"], arcname="one.wav")
    _append(dataset / "audio.jsonl", {"id": "piped", "path": f"{archive}#one.wav", "tar": f"pipe:cat {archive}",
                                      "member": "one.wav"})
    store = precompute.run(_config(dataset, tmp_path / "shards", allow_pipes=True)).store_path
    index = {record["id"]: record for record in map(json.loads, (store / "index.jsonl").read_text().splitlines())}
    assert index["piped"]["status"] == "ok"


@pytest.mark.parametrize("record,message", [
    ("{not json", "not a JSON object"),
    ('["a", "list"]', "a record must be a JSON object, not list"),
    ({"id": "x"}, r"'path' must be a non-empty string \(got None\)"),
    ({"id": 7, "path": "a.wav"}, r"'id' must be a non-empty string \(got 7\)"),
    ({"id": "x", "path": "a.wav", "duration": "long"}, r"'duration' must be a number of seconds or null"),
    ({"id": "x", "path": "ftp://host/a.wav"}, r"path 'ftp://host/a.wav': only local paths and http\(s\):// URLs "
                                              "are read, not ftp://"),
    ({"id": "x", "path": "file:///etc/passwd"}, "path 'file:///etc/passwd': .* not file://"),
    ({"id": "x", "tar": "clips.tar"}, "a record with 'tar' needs 'member' and 'path' strings"),
])
def test_each_malformed_audio_record_is_one_error_naming_file_and_line(dataset, tmp_path, record, message):
    lines = (dataset / "audio.jsonl").read_text().count("\n")
    _append(dataset / "audio.jsonl", record)
    with pytest.raises(ManifestError, match=rf"audio.jsonl:{lines + 1}: {message}"):
        precompute.run(_config(dataset, tmp_path / "shards"))


def test_a_duplicate_id_names_both_lines(dataset, tmp_path):
    first = (dataset / "audio.jsonl").read_text().splitlines()[0]
    lines = (dataset / "audio.jsonl").read_text().count("\n")
    _append(dataset / "audio.jsonl", first)
    with pytest.raises(ManifestError, match=rf"audio.jsonl:{lines + 1}: id '.*' is already used on line 1"):
        precompute.run(_config(dataset, tmp_path / "shards"))


@pytest.mark.parametrize("example,message", [
    ("{not json", "not a JSON object"),
    ({"audio1": "synth-000000", "prompt": "p"}, r"'answer' must be a string \(got None\)"),
    ({"audio1": "synth-000000", "audio2": 3, "prompt": "p", "answer": "a"}, "'audio2' must be a clip id or null"),
    ({"audio1": "no-such-clip", "prompt": "p", "answer": "a"}, "audio1 'no-such-clip' is not a clip of the "
                                                                 "dataset's audio.jsonl"),
])
def test_a_bad_example_line_stops_training_with_file_and_line_and_no_traceback(dataset, mel_store, tmp_path, example,
                                                                                 message):
    lines = (dataset / "train.jsonl").read_text().count("\n")
    _append(dataset / "train.jsonl", example)
    result = CliRunner().invoke(app, ["train", f"--train.store={mel_store}", f"--train.dataset={dataset}",
                                      f"--train.run_dir={tmp_path / 'run'}", "--train.max_updates=2", *TINY_ARGS])
    assert result.exit_code == 2, result.output
    assert f"train.jsonl:{lines + 1}:" in result.output and message.split("\\")[0].split("'")[0] in result.output
    assert "Traceback" not in result.output


class RunsCode:
    """Unpickling this runs a shell command: what a crafted model.pt could hold."""

    def __init__(self, witness: Path) -> None:
        self.witness = witness

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.witness}",)


def test_an_init_from_checkpoint_holding_code_is_refused_and_runs_none(mel_store, tiny_dataset, tmp_path):
    import torch

    from mellow.files import read_json
    from mellow.settings import ModelConfig
    from mellow.train import loop

    from conftest import TINY_MODEL, train_config

    source = tmp_path / "source"
    loop.run(train_config(mel_store, tiny_dataset, source, max_updates=2, save_every=2), ModelConfig(**TINY_MODEL))
    checkpoint = source / read_json(source / "latest.json")["path"]
    witness = tmp_path / "pwned"
    torch.save({"audio_projector.weight": RunsCode(witness)}, checkpoint / "model.pt")
    with pytest.raises(ValueError, match=r"--train.init_from .*model.pt is not a plain file of tensors, so it is "
                                         r"not loaded \(nothing in it ran\)"):
        loop.run(train_config(mel_store, tiny_dataset, tmp_path / "new", init_from=checkpoint),
                  ModelConfig(**TINY_MODEL))
    assert not witness.exists()
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "not a plain file of tensors" in result.output and not witness.exists()
