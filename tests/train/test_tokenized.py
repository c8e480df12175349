"""Tokenised examples: built once into a memory-mapped cache, shared, and rebuilt when stale or damaged."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mellow.manifests import ManifestError
from mellow.model.decoders import load_tokenizer
from mellow.store.reader import EmbeddingStore
from mellow.train import tokens
from mellow.train.data import ExampleSet, load_examples


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny dataset (the tests edit its split and cache)."""
    copy = tmp_path / "synth"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


def _cache_folders(dataset: Path, split: str = "train") -> list[Path]:
    return sorted(p for p in (dataset / ".cache" / "tokens").glob(f"{split}-*") if p.is_dir())


def test_the_cache_holds_what_in_memory_tokenising_gives_and_is_built_once(dataset, mel_store, monkeypatch):
    store, tokenizer = EmbeddingStore(mel_store), load_tokenizer("tiny")
    cached = ExampleSet.from_split(dataset, "train", store, tokenizer, 64)
    in_memory = ExampleSet(load_examples(dataset, "train"), store, tokenizer, 64)
    assert len(cached) == len(in_memory) > 0 and len(_cache_folders(dataset)) == 1
    assert isinstance(cached.tokenized.prompt_tokens, np.memmap)  # mapped, not loaded
    for name in tokens.ARRAYS:
        np.testing.assert_array_equal(getattr(cached.tokenized, name), getattr(in_memory.tokenized, name))
    assert cached.examples == in_memory.examples  # the records, read back from the split file when asked for
    for index, example in enumerate(cached.examples[:20]):  # the ids transformers' own call gives
        expected = tokenizer(example["answer"], add_special_tokens=False)["input_ids"][:32] + [tokenizer.eos_token_id]
        assert cached.answer_ids(index) == expected
        prompt = tokenizer(example["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        assert cached.prompt_ids(index) == prompt[len(prompt) - (64 - len(expected)):]
    batch, expected = cached.batch([0, 5, 3]), in_memory.batch([0, 5, 3])
    assert all(torch.equal(batch[key], expected[key]) for key in expected)

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tokens, "tokenize_chunk", fail)  # also in the forked workers
    again = ExampleSet.from_split(dataset, "train", store, tokenizer, 64)  # a resume, another rank, eval
    np.testing.assert_array_equal(again.tokenized.answer_tokens, cached.tokenized.answer_tokens)
    with pytest.raises(AssertionError, match="tokenised again"):  # other settings are another cache
        ExampleSet.from_split(dataset, "train", store, tokenizer, 32)


def test_repeated_texts_are_tokenised_once_and_give_what_the_tokenizer_gives():
    tokenizer = load_tokenizer("tiny")
    texts = ["yes", "Is a dog barking?", "no", "yes", "yes", "Is a dog barking?", ""]
    assert tokens.token_ids(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    seen = []
    backend = tokenizer.backend_tokenizer
    encode = backend.encode_batch

    class Counting:  # the Rust tokenizer's attributes are read-only: wrap it
        def encode_batch(self, batch, **kwargs):
            seen.extend(batch)
            return encode(batch, **kwargs)

    tokenizer._tokenizer = Counting()
    try:
        tokens.token_ids(tokenizer, texts)
    finally:
        tokenizer._tokenizer = backend
    assert sorted(seen) == sorted(set(texts))


def test_an_edited_split_and_a_flipped_byte_are_rebuilt_not_trusted(dataset, mel_store):
    store, tokenizer = EmbeddingStore(mel_store), load_tokenizer("tiny")
    first = ExampleSet.from_split(dataset, "train", store, tokenizer, 64)
    count = len(first)
    split = dataset / "train.jsonl"
    lines = split.read_text().splitlines()
    edited = {**json.loads(lines[0]), "answer": "an entirely new answer"}
    split.write_text("\n".join(lines + [json.dumps(edited)]) + "\n")
    grown = ExampleSet.from_split(dataset, "train", store, tokenizer, 64)
    assert len(grown) == count + 1 and grown.examples[-1]["answer"] == "an entirely new answer"
    assert len(_cache_folders(dataset)) == 2  # the old key's cache is left alone; the new one is separate

    newest = next(f for f in _cache_folders(dataset) if json.loads((f / "meta.json").read_text())["examples"]
                  == count + 1)
    data = bytearray((newest / "answer_tokens.npy").read_bytes())
    data[-3] ^= 0x40  # a token id changes; the file still loads
    (newest / "answer_tokens.npy").write_bytes(bytes(data))
    rebuilt = ExampleSet.from_split(dataset, "train", store, tokenizer, 64)
    fresh = ExampleSet(load_examples(dataset, "train"), store, tokenizer, 64)
    np.testing.assert_array_equal(rebuilt.tokenized.answer_tokens, fresh.tokenized.answer_tokens)


def test_a_bad_line_in_a_split_names_file_and_line(dataset, mel_store):
    store, tokenizer = EmbeddingStore(mel_store), load_tokenizer("tiny")
    split = dataset / "train.jsonl"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[:2] + ['{"audio1": 7, "prompt": "p", "answer": "a"}'] + lines[2:]) + "\n")
    with pytest.raises(ManifestError, match=r"train.jsonl:3: 'audio1' must be a string \(got 7\)"):
        ExampleSet.from_split(dataset, "train", store, tokenizer, 64)
    split.write_text("\n".join(lines[:4] + ["{not json"]) + "\n")
    with pytest.raises(ManifestError, match=r"train.jsonl:5: not a JSON object"):
        ExampleSet.from_split(dataset, "train", store, tokenizer, 64)


def test_tokenising_a_file_over_processes_gives_what_one_process_gives(dataset, mel_store, monkeypatch):
    store, tokenizer = EmbeddingStore(mel_store), load_tokenizer("tiny")
    split = dataset / "train.jsonl"
    lines = split.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    split.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n\n")  # blank lines keep their line numbers
    monkeypatch.setattr(tokens, "TOKENIZE_CHUNK", 7)  # many chunks, the last one short (fork inherits it)
    failed = records[5]["audio1"]  # as if this clip had failed to encode: its examples are skipped

    def rows_of(ids, absent):
        return np.where(np.asarray(ids) == failed, -1, store.rows.lookup(ids, absent))

    one = tokens.tokenize_file(split, rows_of, tokenizer, 24, "\n", processes=1)
    three = tokens.tokenize_file(split, rows_of, tokenizer, 24, "\n", processes=3)
    skipped = sum(failed in (record["audio1"], record.get("audio2")) for record in records)
    assert one.skipped == three.skipped == skipped > 0
    assert len(one) == len(lines) - skipped > 7 * 3
    for name in tokens.ARRAYS:
        np.testing.assert_array_equal(getattr(one, name), getattr(three, name))
    kept = [number for number, record in enumerate(records) if failed not in (record["audio1"], record.get("audio2"))]
    assert one.line.tolist() == kept  # numbers count example lines: the blank one is not one
    bad = [json.dumps(record) for record in records]
    for broken, error, message in (
            ("{not json", ManifestError, r"train.jsonl:18: not a JSON object"),
            (json.dumps({**records[16], "audio1": "no-such-clip"}), tokens.UnknownClipError,
             r"example 16: audio1 'no-such-clip' is not a clip")):
        split.write_text("\n".join(bad[:3] + [""] + bad[3:16] + [broken] + bad[17:]) + "\n")
        with pytest.raises(error, match=message):
            tokens.tokenize_file(split, store.rows.lookup, tokenizer, 24, "\n", processes=3)


def _build_in_a_forked_process(dataset: Path, store_path: Path) -> tuple[bool, int]:
    built = []
    original = tokens.tokenize_file
    tokens.tokenize_file = lambda *args, **kwargs: built.append(1) or original(*args, **kwargs)
    examples = tokens.load_split(dataset, "train", EmbeddingStore(store_path), load_tokenizer("tiny"), 64, "\n")
    return bool(built), len(examples)


def test_processes_started_together_build_it_once_and_a_lock_file_left_behind_does_not_block(dataset, mel_store):
    folder, _ = tokens.cache_location(dataset, "train", EmbeddingStore(mel_store), load_tokenizer("tiny"), 64, "\n")
    folder.with_name(folder.name + ".lock").write_text("")  # as a killed builder leaves it: no process holds it
    with multiprocessing.get_context("fork").Pool(3) as pool:  # real processes, as ranks are
        results = pool.starmap(_build_in_a_forked_process, [(dataset, mel_store)] * 3)
    assert sorted(built for built, _ in results) == [False, False, True], results
    assert len({count for _, count in results}) == 1 and results[0][1] > 0
    assert len(_cache_folders(dataset)) == 1
