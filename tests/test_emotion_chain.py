"""The emotion recipe (stages/configs/emotion.yaml, emotion-meld.yaml) end to end on fixtures in the exact
layouts: a labelled WebDataset tar set (audio + json with an emotion and a caption) and MELD.Raw (mp4 videos
with an AAC track, CSVs of mixed encodings). Stage 1 precomputes both with one encoder, stage 2 aligns, stage 3
trains (stopped and resumed), stage 4 fine-tunes on MELD from stage 3, class-balanced; each is evaluated, and
`mellow leaderboard` puts the three in one table. The recipe's own YAML files are used, with tiny models.

In the slow tier (`uv run pytest -m slow`, run by .ci/run): ~25 s that the default suite's budget cannot spare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset
from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import read_json, read_jsonl

from conftest import TINY_ARGS

CONFIGS = Path(__file__).resolve().parents[1] / "stages" / "configs"
EMOTIONS = ["joy", "anger", "neutral", "sadness"]
ENCODER = ["--encoder", "mel", "--clip-seconds", "3", "--tokens", "4"]
EXPECTED = ["--encoder.name=mel", "--encoder.clip_seconds=3", "--encoder.tokens=4"]
SMALL = ["--train.batch_size=4", "--train.precision=fp32", "--train.val_every=0", "--train.warmup_updates=1",
         "--train.cooldown_updates=0", "--train.save_every=3", "--model.decoder_mode=full", *TINY_ARGS, *EXPECTED]


def invoke(*arguments: object) -> str:
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    return result.output


def labelled_tars(dataset: Path, folder: Path) -> Path:
    """The tiny synthetic set's clips as a LAION's-Got-Talent-style tar: audio + json (emotion, caption, split)."""
    captions = {e["audio1"]: e["answer"] for split in ("train", "val", "test")
                for e in read_jsonl(dataset / f"{split}.jsonl") if e["task"] == "caption"}
    tar = folder / "lgt-000000.tar"
    with webdataset.TarWriter(str(tar)) as writer:
        for number, record in enumerate(read_jsonl(dataset / "audio.jsonl")):
            meta = {"split": record["split"], "emotion": EMOTIONS[number % len(EMOTIONS)],
                    "caption": captions.get(record["id"], "a sound")}
            writer.write({"__key__": record["id"], record["path"].rsplit(".", 1)[1]:
                          (dataset / record["path"]).read_bytes(), "json": json.dumps(meta).encode()})
    return tar


@pytest.mark.slow
def test_the_emotion_recipe_runs_its_four_stages_and_one_leaderboard(tiny_dataset, meld_folder,
                                                                      tmp_path):
    datasets, shards, runs = tmp_path / "datasets", tmp_path / "shards", tmp_path / "checkpoints"
    # stage 1: both sets precomputed once, with one encoder
    invoke("prepare", "--source", f"wds:{labelled_tars(tiny_dataset, tmp_path)}", "--name", "lgt", "--root",
           datasets, "--label-field", "emotion")
    invoke("prepare", "--source", f"meld:{meld_folder}", "--name", "meld", "--root", datasets)
    for name in ("lgt", "meld"):
        invoke("precompute", datasets / name, *ENCODER, "--store-root", shards, "--shard-clips", 8)
    [lgt_store], [meld_store] = (list((shards / name).iterdir()) for name in ("lgt", "meld"))
    # stage 2: the projector aligned to the captions; its eval is the retrieval it reports
    invoke("precompute-captions", datasets / "lgt", "--store-root", tmp_path / "captions")
    [captions] = (tmp_path / "captions" / "lgt").iterdir()
    invoke("align", "--store", lgt_store, "--captions", captions, "--dataset", datasets / "lgt", "--run-dir",
           runs / "align", "--tiny-hidden", 32, "--updates", 4, "--batch-size", 4, "--val-every", 0)
    # stage 3: the large set, stopped and resumed with the same command, then extended by epochs
    stage3 = ["train", "--resume", "--config", CONFIGS / "emotion.yaml", f"--train.store={lgt_store}",
              f"--train.dataset={datasets / 'lgt'}", f"--train.run_dir={runs / 'lgt'}", "--train.epochs=1",
              f"--train.align_from={runs / 'align'}", *SMALL]
    assert "stopped" in invoke(*stage3, "--train.stop_after=3")
    assert "resuming" in invoke(*stage3, "--train.stop_after=0")  # to the end of the 1-epoch plan
    first_end = read_json(runs / "lgt" / "latest.json")["update"]
    assert first_end > 3
    extended = invoke("train", "--resume", f"--train.run_dir={runs / 'lgt'}", "--train.epochs=2")
    assert f"re-planned: {first_end} -> " in extended and "the stable rate goes on" in extended
    assert read_json(runs / "lgt" / "latest.json")["update"] > first_end
    invoke("eval", runs / "lgt", "--which", "latest", "--max-new-tokens", 6, "--no-similarity")
    # stage 4: MELD, from stage 3's weights, balanced
    output = invoke("train", "--resume", "--config", CONFIGS / "emotion-meld.yaml", f"--train.store={meld_store}",
                    f"--train.dataset={datasets / 'meld'}", f"--train.run_dir={runs / 'meld'}",
                    f"--train.init_from={runs / 'lgt'}", "--train.max_updates=4", *SMALL)
    assert "initialised from" in output and "balancing the 7 classes of emotion by sampler" in output
    for mode in ("generate", "rank"):
        invoke("eval", runs / "meld", "--which", "latest", "--max-new-tokens", 6, "--no-similarity",
               "--closed", mode)
    ranked = read_json(runs / "meld" / "step-000004" / "eval-test-rank" / "scores.json")["scores"]
    assert ranked["emotion"]["outside_label_set"] == 0 and ranked["sentiment"]["outside_label_set"] == 0

    invoke("leaderboard", runs / "align", runs / "lgt", runs / "meld", "--output", tmp_path / "chain")
    rows = read_json(tmp_path / "chain.json")
    assert [row["stage"] for row in rows] == ["align", "train", "train"]
    assert "retrieval text_to_audio_R@1" in rows[0]["figures"]
    assert {"emotion uar", "emotion macro_f1", "caption cider_d"} <= set(rows[1]["figures"])
    assert {"emotion weighted_f1", "sentiment weighted_f1", "emotion accuracy"} <= set(rows[2]["figures"])
    table = (tmp_path / "chain.md").read_text()
    assert table.count(str(runs)) == 3 and "emotion weighted_f1" in table
