"""WebDataset tars of audio + json as input to 00_prepare and 01_precompute: local, pipe: and HTTP, with the
stock webdataset writer making the tars and a real HTTP server serving them."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset
from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import read_json, read_jsonl, write_jsonl_atomic

from conftest import invoke_ok, rows_by_id

PRECOMPUTE = ["--encoder", "mel", "--clip-seconds", "3", "--tokens", "4", "--shard-clips", "8"]


@pytest.fixture(scope="module")
def tars(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset's clips in two tars (key = clip id, json with captions, split and duration), plus a
    sample with no audio and one whose audio bytes are not audio."""
    folder = tmp_path_factory.mktemp("tars")
    captions = {e["audio1"]: e["references"] for split in ("train", "val", "test")
                for e in read_jsonl(tiny_dataset / f"{split}.jsonl") if e["task"] == "caption"}
    records = read_jsonl(tiny_dataset / "audio.jsonl")
    for part, chunk in enumerate((records[:12], records[12:])):
        with webdataset.TarWriter(str(folder / f"part-{part:06d}.tar")) as writer:
            for record in chunk:
                extension = record["path"].rsplit(".", 1)[1]
                meta = {"split": record["split"], "duration": record["duration"]}
                if record["id"] in captions:
                    meta["captions"] = captions[record["id"]]
                writer.write({"__key__": record["id"], extension: (tiny_dataset / record["path"]).read_bytes(),
                              "json": json.dumps(meta).encode()})
            if part == 1:
                writer.write({"__key__": "only-json", "json": b'{"caption": "no audio here"}'})
                writer.write({"__key__": "corrupt", "flac": b"fLaC but not really" * 40,
                              "json": b'{"caption": "broken", "split": "train"}'})
    return folder


def test_local_tars_prepare_and_precompute_like_plain_files(tars, tiny_dataset, mel_store, tmp_path):
    invoke_ok("prepare", "--source", f"wds:{tars}/part-{{000000..000001}}.tar", "--name", "fromtars",
            "--root", str(tmp_path / "datasets"))
    dataset = tmp_path / "datasets" / "fromtars"
    records = read_jsonl(dataset / "audio.jsonl")
    assert len(records) == 25 and {"tar", "member", "sha256"} <= set(records[0])
    assert records[0]["tar"] == str(tars / "part-000000.tar") and records[0]["member"].startswith("synth-")
    original = {r["id"]: r for r in read_jsonl(tiny_dataset / "audio.jsonl")}
    for record in records[:24]:
        assert record["sha256"] == original[record["id"]]["sha256"]  # the bytes of the very same file
        assert record["split"] == original[record["id"]]["split"]
    prepared = read_json(dataset / "prepare.json")
    assert [f["key"] for f in prepared["failures"]] == ["only-json"]
    assert "no audio member" in prepared["failures"][0]["reason"]
    captions = [e for split in ("train", "val", "test") for e in read_jsonl(dataset / f"{split}.jsonl")]
    assert captions and all(e["task"] == "caption" and e["references"] for e in captions)

    result = CliRunner().invoke(app, ["precompute", str(dataset), *PRECOMPUTE, "--store-root",
                                      str(tmp_path / "shards"), "--max-failures", "0.1"])
    assert result.exit_code == 0 and "24 clips ok, 1 failed" in result.output, result.output
    [store_path] = (tmp_path / "shards" / "fromtars").iterdir()
    statuses = {r["id"]: r["status"] for r in read_jsonl(store_path / "index.jsonl")}
    assert statuses["corrupt"].startswith(f"failed: {tars / 'part-000001.tar'}#corrupt.flac: ")  # ffmpeg's reason
    from_tars, from_files = rows_by_id(store_path), rows_by_id(mel_store)
    assert from_tars.keys() == from_files.keys()
    for clip, (embedding, valid) in from_files.items():  # decoding from memory = decoding the file
        np.testing.assert_array_equal(from_tars[clip][0], embedding)
        assert from_tars[clip][1] == valid


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow  # it waits out a stalled server's timeout
@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// tars with curl")
def test_pipe_and_http_tars_a_dead_url_and_a_stalled_server(tars, tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                  directory=str(tars)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/part-000000.tar"
    dead = "http://127.0.0.1:9/part-000009.tar"
    stalled_socket = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    stalled = f"http://127.0.0.1:{stalled_socket.getsockname()[1]}/part-000008.tar"
    monkeypatch.setenv("MELLOW_HTTP_STALL_SECONDS", "2")
    monkeypatch.setenv("MELLOW_HTTP_RETRIES", "1")
    try:
        invoke_ok("prepare", "--source", f"wds:pipe:cat {tars}/part-000001.tar::{url}::{dead}::{stalled}",
                "--name", "remote", "--root", str(tmp_path / "datasets"))
        dataset = tmp_path / "datasets" / "remote"
        records = read_jsonl(dataset / "audio.jsonl")
        assert {r["tar"] for r in records} == {f"pipe:cat {tars}/part-000001.tar", url}
        assert len(records) == 25
        failures = read_json(dataset / "prepare.json")["failures"]
        assert {f["tar"] for f in failures if "reading the tar failed" in f["reason"]} == {dead, stalled}
        invoke_ok("precompute", str(dataset), *PRECOMPUTE, "--store-root", str(tmp_path / "shards"),
                "--max-failures", "0.1")
        [store_path] = (tmp_path / "shards" / "remote").iterdir()
        assert read_json(store_path / "meta.json")["counts"] == {"rows": 25, "ok": 24, "failed": 1}
    finally:
        server.shutdown()
        server.server_close()
        stalled_socket.close()
    # the server is gone: the clips of its tar fail with the reason, the piped tar's clips still encode
    write_jsonl_atomic(dataset / "audio.jsonl", records[:3] + [r for r in records if r["tar"] == url][:3])
    shutil.rmtree(dataset.parent.parent / "shards2", ignore_errors=True)
    result = CliRunner().invoke(app, ["precompute", str(dataset), *PRECOMPUTE, "--store-root",
                                      str(tmp_path / "shards2"), "--max-failures", "0.6"])
    assert result.exit_code == 0, result.output
    [store_path] = (tmp_path / "shards2" / "remote").iterdir()
    statuses = [r["status"] for r in read_jsonl(store_path / "index.jsonl")]
    assert statuses[:3] == ["ok"] * 3
    assert all(s.startswith("failed: ") and "reading the tar failed" in s for s in statuses[3:]), statuses


def test_a_bad_source_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--source", "wds:", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "--source 'wds:' needs a location: wds:<tars>" in result.output
    result = CliRunner().invoke(app, ["prepare", "--source", f"wds:{tmp_path}/none-{{0..1}}.tar", "--name", "x",
                                      "--root", str(tmp_path)])
    assert result.exit_code == 2 and "no usable audio in 2 tar(s)" in result.output


def test_a_json_field_of_labelled_tars_becomes_a_closed_label_task(tiny_dataset, tmp_path):
    records = read_jsonl(tiny_dataset / "audio.jsonl")[:6]
    emotions = ["joy", ["anger", "fear"], "neutral", "joy", None, "sadness"]
    with webdataset.TarWriter(str(tmp_path / "speech-000000.tar")) as writer:
        for record, emotion, split in zip(records, emotions, ["train"] * 3 + ["test"] * 3):
            meta = {"split": split, **({"emotion": emotion} if emotion else {})}
            writer.write({"__key__": record["id"], record["path"].rsplit(".", 1)[1]:
                          (tiny_dataset / record["path"]).read_bytes(), "json": json.dumps(meta).encode()})
    invoke_ok("prepare", "--source", f"wds:{tmp_path / 'speech-000000.tar'}", "--name", "speech", "--root",
            str(tmp_path / "datasets"), "--label-field", "emotion")
    dataset = tmp_path / "datasets" / "speech"
    assert read_json(dataset / "prepare.json")["label_tasks"] == {"emotion": ["anger", "fear", "joy", "neutral",
                                                                              "sadness"]}
    train = [(e["audio1"], e["answer"]) for e in read_jsonl(dataset / "train.jsonl") if e["task"] == "emotion"]
    ids = [record["id"] for record in records]
    assert train == [(ids[0], "joy"), (ids[1], "anger"), (ids[1], "fear"), (ids[2], "neutral")]
    test = [(e["audio1"], e["answer"]) for e in read_jsonl(dataset / "test.jsonl") if e["task"] == "emotion"]
    assert test == [(ids[3], "joy"), (ids[5], "sadness")]
