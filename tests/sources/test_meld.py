"""`meld:<folder>` on a fixture in MELD.Raw's exact layout: the three CSVs with the real files' mixed encodings
(cp1252 bytes, UTF-8 mojibake), mp4 videos made with ffmpeg holding a video and an AAC audio track, a file the
CSV names that is missing; then 01_precompute decodes the audio tracks and the eval's classification figures."""

from __future__ import annotations

from typer.testing import CliRunner

from mellow.cli import app
from mellow.files import read_json, read_jsonl
from mellow.sources.meld import MELD_LABELS
from mellow.store.reader import EmbeddingStore

from conftest import HEADER


def test_meld_becomes_emotion_and_sentiment_tasks_with_readable_text_and_its_audio_tracks_encode(
        meld_folder, tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--source", f"meld:{meld_folder}", "--name", "meld", "--root",
                                      str(tmp_path), "--meld-text"])
    assert result.exit_code == 0, result.output
    assert "dev_splits_complete/dia1_utt0.mp4" in result.output  # the missing file is listed, not fatal
    dataset = tmp_path / "meld"
    prepared = read_json(dataset / "prepare.json")
    assert prepared["label_tasks"] == MELD_LABELS and prepared["config"]["meld_text"] is True
    assert len(prepared["failures"]) == 1
    train = read_jsonl(dataset / "train.jsonl")
    assert [(e["task"], e["subtask"], e["answer"]) for e in train[:2]] == [
        ("emotion", "emotion+text", "surprise"), ("sentiment", "sentiment+text", "positive")]
    transcripts = [example["transcript"] for example in train[::2]]
    assert transcripts == ["Oh my God, you\u2019re here!", "I don\u2019t want to talk about it.",
                           "It\u2019s fine, really.", "Great."]
    assert 'The speaker says: "It\u2019s fine, really."' in train[4]["prompt"]
    assert train[0]["prompt"].endswith("Answer with one of: anger, disgust, fear, joy, neutral, sadness, surprise.")
    assert len(read_jsonl(dataset / "val.jsonl")) == 4 and len(read_jsonl(dataset / "test.jsonl")) == 4

    result = CliRunner().invoke(app, ["precompute", str(dataset), "--encoder", "mel", "--clip-seconds", "2",
                                      "--tokens", "4", "--store-root", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    [store_path] = (tmp_path / "shards" / "meld").iterdir()
    store = EmbeddingStore(store_path)
    assert store.meta["counts"] == {"rows": 8, "ok": 8, "failed": 0}  # every audio track decoded from its mp4
    loudness = store.load_all()[0].reshape(8, -1).std(axis=1)
    assert (loudness > 0).all()


def test_a_meld_folder_without_its_csvs_or_with_a_wrong_label_is_reported(meld_folder, tmp_path):
    result = CliRunner().invoke(app, ["prepare", "--source", f"meld:{tmp_path}", "--root", str(tmp_path / "d")])
    assert result.exit_code == 2 and "no train_sent_emo.csv" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_sent_emo.csv").write_bytes(HEADER.encode() + b'1,"Hi.",Ross,happy,positive,0,0,1,1,"",""\n'
                                               + b'2,"Ew!",Ross,disgust,negative,0,1,1,1,"",""\n')
    (broken / "output_repeated_splits_test").symlink_to(meld_folder / "output_repeated_splits_test")
    result = CliRunner().invoke(app, ["prepare", "--source", f"meld:{broken}", "--name", "broken", "--root",
                                      str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "test_sent_emo.csv line 2: emotion 'happy' is not a MELD label" in " ".join(result.output.split())
    assert [e["answer"] for e in read_jsonl(tmp_path / "d" / "broken" / "test.jsonl")] == ["disgust", "negative"]
