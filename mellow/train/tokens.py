"""A split's examples tokenised once into flat arrays, cached on disk and memory-mapped by every process.

Tokenising a million examples on every start, in every rank, and keeping them as Python objects that DataLoader
workers copy page by page (fork + reference counts, pytorch #13246) cost +90 s and 5.8 GB at 1 M examples. Here
the split is tokenised once per (split file sha256, tokenizer, settings, store index) into

    <dataset>/.cache/tokens/<split>-<key>/
        prompt_tokens.npy  prompt_offsets.npy    int32 token ids of every prompt, flat; int64 (n + 1) offsets
        answer_tokens.npy  answer_offsets.npy    the same for answers (each ends in EOS)
        row1.npy  row2.npy                       int64 store rows of the audios (-1: no second audio)
        line.npy                                 int64 line of each example in the split file (0-based)
        meta.json                                what the key was made of, counts, crc32c of every file

built by one process while the others wait on its flock (released by the kernel if the builder dies), committed
by renaming a finished folder into place, and checked (crc32c of every file) by each process that opens it: a
stale or damaged cache is rebuilt, never trusted. Workers inherit the memory maps; nothing per example is a
Python object.
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from mellow.files import cache_dir, sha256_file, short_hash, write_json_atomic
from mellow.manifests import ManifestError, check_example, json_lines, parse_json_line
from mellow.progress import console

ARRAYS = ("prompt_tokens", "prompt_offsets", "answer_tokens", "answer_offsets", "row1", "row2", "line")


CACHE_VERSION = 1


TOKENIZE_CHUNK = 8192  # examples per tokenizer call: batched (fast), with bounded memory


@dataclass
class TokenizedExamples:
    """Flat arrays of one split's usable examples (see the module docstring); numpy, often memory-mapped."""

    prompt_tokens: np.ndarray
    prompt_offsets: np.ndarray
    answer_tokens: np.ndarray
    answer_offsets: np.ndarray
    row1: np.ndarray
    row2: np.ndarray
    line: np.ndarray
    skipped: int = 0  # examples whose audio is not in the store

    def __len__(self) -> int:
        return len(self.row1)

    def prompt(self, index: int) -> np.ndarray:
        return self.prompt_tokens[self.prompt_offsets[index] : self.prompt_offsets[index + 1]]

    def answer(self, index: int) -> np.ndarray:
        return self.answer_tokens[self.answer_offsets[index] : self.answer_offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        """(n,) prompt + answer tokens of every example."""
        return np.diff(self.prompt_offsets) + np.diff(self.answer_offsets)

    def first(self, count: int) -> TokenizedExamples:
        """The first `count` examples (views, no copy)."""
        count = min(count, len(self))
        return TokenizedExamples(self.prompt_tokens, self.prompt_offsets[: count + 1], self.answer_tokens,
                                 self.answer_offsets[: count + 1], self.row1[:count], self.row2[:count],
                                 self.line[:count], self.skipped)


def tokenizer_identity(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would give other ids: its whole definition where it is a fast
    (Rust) tokenizer, else its vocabulary, plus the special-token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return short_hash([type(tokenizer).__name__, definition, tokenizer.eos_token_id, tokenizer.pad_token_id], 16)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, each distinct text tokenised once (splits repeat
    answers such as "yes" and instruction prompts many times); for a fast tokenizer straight from its Rust
    backend, which halves the time (transformers' per-text conversion cost as much as the tokenising)."""
    distinct = list(dict.fromkeys(texts))
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "split_special_tokens", False):
        ids = [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(distinct,
                                                                                     add_special_tokens=False)]
    else:
        ids = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    if len(distinct) == len(texts):
        return ids
    of_text = dict(zip(distinct, ids))
    return [of_text[text] for text in texts]


UNKNOWN_CLIP = -2  # a row lookup's answer for an id that is not in the store's index (nor audio.jsonl)


class UnknownClipError(ManifestError):
    """An example names a clip that its dataset's audio.jsonl does not list."""

    def __init__(self, number: int, key: str, clip_id: str, where: str = "") -> None:
        self.number, self.key, self.clip_id = number, key, clip_id
        super().__init__(f"{where or f'example {number}'}: {key} {clip_id!r} is not a clip of the dataset's "
                         "audio.jsonl (nor of the store made from it); fix the example, or add the clip to "
                         "audio.jsonl and rerun 01_precompute")
        self.where = where

    def __reduce__(self):  # raised in a tokenize_file worker, it crosses to the parent by pickle
        return UnknownClipError, (self.number, self.key, self.clip_id, self.where)


def tokenize(examples: Iterator[tuple[int, dict]], rows_of, tokenizer, max_text_tokens: int,
             prompt_suffix: str) -> TokenizedExamples:
    """Tokenise (line, example) pairs in chunks; `rows_of(ids)` gives store rows (-1: missing). Examples whose
    audio is missing are skipped. Answers keep at most max_text_tokens // 2 tokens plus EOS, prompts their end."""
    chunks = iter(lambda: list(itertools.islice(examples, TOKENIZE_CHUNK)), [])
    return concatenate([tokenize_chunk(chunk, rows_of, tokenizer, max_text_tokens, prompt_suffix)
                        for chunk in chunks])


def tokenize_chunk(chunk: list[tuple[int, dict]], rows_of, tokenizer, max_text_tokens: int,
                   prompt_suffix: str) -> TokenizedExamples:
    """`tokenize` of one chunk of (line, example) pairs."""
    eos = tokenizer.eos_token_id
    row1 = rows_of([example["audio1"] for _, example in chunk], absent=UNKNOWN_CLIP)
    row2 = np.where([example.get("audio2") is None for _, example in chunk], -1,
                    rows_of([example.get("audio2") or example["audio1"] for _, example in chunk], absent=UNKNOWN_CLIP))
    for rows, key in ((row1, "audio1"), (row2, "audio2")):
        if (rows == UNKNOWN_CLIP).any():
            number, example = chunk[int(np.flatnonzero(rows == UNKNOWN_CLIP)[0])]
            raise UnknownClipError(number, key, example[key])
    has_audio2 = np.array([example.get("audio2") is not None for _, example in chunk], dtype=bool)
    keep = (row1 >= 0) & (~has_audio2 | (row2 >= 0))
    chunk = [pair for pair, kept in zip(chunk, keep) if kept]
    prompts = token_ids(tokenizer, [e["prompt"] + prompt_suffix for _, e in chunk])
    answers = [answer[: max_text_tokens // 2] + [eos] for answer in token_ids(tokenizer, [e["answer"]
                                                                                        for _, e in chunk])]
    prompts = [prompt[max(len(prompt) - (max_text_tokens - len(answer)), 0) :] if max_text_tokens > len(answer)
               else [] for prompt, answer in zip(prompts, answers)]
    arrays = {}
    for name, texts in (("prompt", prompts), ("answer", answers)):
        lengths = np.array([len(text) for text in texts], dtype=np.int64)
        arrays[f"{name}_tokens"] = np.fromiter(itertools.chain.from_iterable(texts), dtype=np.int32,
                                               count=int(lengths.sum()))
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedExamples(**arrays, row1=row1[keep], row2=row2[keep],
                             line=np.array([number for number, _ in chunk], dtype=np.int64),
                             skipped=int((~keep).sum()))


def concatenate(parts: list[TokenizedExamples]) -> TokenizedExamples:
    """The examples of `parts`, one after another, as one set of flat arrays."""
    arrays = {}
    for name in ("prompt", "answer"):
        arrays[f"{name}_tokens"] = np.concatenate([np.zeros(0, np.int32)] + [getattr(part, f"{name}_tokens")
                                                                            for part in parts])
        ends = np.cumsum([0] + [len(getattr(part, f"{name}_tokens")) for part in parts])
        arrays[f"{name}_offsets"] = np.concatenate([np.zeros(1, np.int64)] + [
            getattr(part, f"{name}_offsets")[1:] + end for part, end in zip(parts, ends)])
    for name in ("row1", "row2", "line"):
        arrays[name] = np.concatenate([np.zeros(0, np.int64)] + [getattr(part, name) for part in parts])
    return TokenizedExamples(**arrays, skipped=sum(part.skipped for part in parts))


def tokenize_file(path: Path, rows_of, tokenizer, max_text_tokens: int, prompt_suffix: str,
                  processes: int | None = None) -> TokenizedExamples:
    """`tokenize` of a split file, its chunks spread over `processes` forked processes (default: one per core
    this process may use on Linux; one elsewhere, where forking a process that has loaded torch is unsafe).
    The Rust tokenizer alone already runs on every core, but the JSON parsing, the checks and the conversion of
    its output, which take about as long again, run on one. The same result as `tokenize`'s, errors included
    (a bad line or an unknown clip raises here, naming it)."""
    processes = processes or (len(os.sched_getaffinity(0)) if sys.platform.startswith("linux") else 1)
    if processes <= 1 or multiprocessing.current_process().daemon:  # a daemonic process may not start others
        with garbage_collector_paused():
            return concatenate([tokenize_chunk(_parsed(chunk, path), rows_of, tokenizer, max_text_tokens,
                                               prompt_suffix) for chunk in _raw_chunks(path)])
    context = multiprocessing.get_context("fork")  # the workers inherit the tokenizer and the store's index
    with (garbage_collector_paused(),
          ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                              initargs=(path, rows_of, tokenizer, max_text_tokens, prompt_suffix)) as pool):
        pending, parts = deque(), []
        for chunk in _raw_chunks(path):
            pending.append(pool.submit(_tokenize_in_worker, chunk))
            if len(pending) >= 2 * processes:  # a bounded number of chunks in flight
                parts.append(pending.popleft().result())
        parts.extend(future.result() for future in pending)
    return concatenate(parts)


def _raw_chunks(path: Path) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """(number of the first example, [(line number, line)] of TOKENIZE_CHUNK example lines) of a split file."""
    number, chunk = 0, []
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                chunk.append((line_number, line))
                if len(chunk) == TOKENIZE_CHUNK:
                    yield number, chunk
                    number, chunk = number + len(chunk), []
    if chunk:
        yield number, chunk


_worker_inputs: tuple = ()  # what tokenize_file's worker processes were given (inherited by fork)


def _start_worker(*inputs) -> None:
    global _worker_inputs
    _worker_inputs = inputs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    gc.disable()  # as in the parent; here a collection would also write to every object inherited from it


@contextmanager
def garbage_collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while tokenising: the per-chunk lists and dicts hold no cycles (their
    reference counts free them), and each collection walks every object of the process (torch's and
    transformers' included) again: 18% of the tokenising time with it on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _tokenize_in_worker(chunk: tuple[int, list[tuple[int, bytes]]]) -> TokenizedExamples:
    path, rows_of, tokenizer, max_text_tokens, prompt_suffix = _worker_inputs
    return tokenize_chunk(_parsed(chunk, path), rows_of, tokenizer, max_text_tokens, prompt_suffix)


def _parsed(chunk: tuple[int, list[tuple[int, bytes]]], path: Path) -> list[tuple[int, dict]]:
    """(number among the example lines, example) of a chunk of `_raw_chunks`; one clear error per bad line."""
    first, lines = chunk
    return [(first + index, check_example(parse_json_line(line, f"{path}:{line_number}"), f"{path}:{line_number}"))
            for index, (line_number, line) in enumerate(lines)]


def cache_folder(dataset: Path, split: str, key: str) -> Path:
    """<dataset>/.cache/tokens/<split>-<key>, or under $MELLOW_CACHE when the dataset folder is read-only."""
    folder = dataset / ".cache" / "tokens"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError
    except OSError:
        folder = cache_dir() / "tokens" / f"{dataset.resolve().name}-{short_hash(str(dataset.resolve()))}"
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{split}-{key}"


def cache_location(dataset: Path, split: str, store, tokenizer, max_text_tokens: int, prompt_suffix: str,
                   split_sha256: str | None = None) -> tuple[Path, dict]:
    """The cache folder of these inputs and settings, and the key it is made from."""
    key_parts = {"version": CACHE_VERSION, "split_sha256": split_sha256 or sha256_file(dataset / f"{split}.jsonl"),
                 "tokenizer": tokenizer_identity(tokenizer), "max_text_tokens": max_text_tokens,
                 "prompt_suffix": prompt_suffix, "store_index_sha256": store.index_sha256()}
    return cache_folder(dataset, split, short_hash(key_parts, 16)), key_parts


def load_split(dataset: Path, split: str, store, tokenizer, max_text_tokens: int, prompt_suffix: str,
               split_sha256: str | None = None) -> TokenizedExamples:
    """The split's tokenised examples from the cache, building it first when it is missing, stale or damaged."""
    path = dataset / f"{split}.jsonl"
    folder, key_parts = cache_location(dataset, split, store, tokenizer, max_text_tokens, prompt_suffix,
                                       split_sha256)
    cached = open_cache(folder, key_parts)
    if cached is not None:
        return cached
    with held_lock(folder.with_name(folder.name + ".lock")):
        cached = open_cache(folder, key_parts, quiet=True)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        try:
            built = tokenize_file(path, store.rows.lookup, tokenizer, max_text_tokens, prompt_suffix)
        except UnknownClipError as error:  # name the line, as for any other bad line
            line = next(line for number, (line, _) in enumerate(json_lines(path)) if number == error.number)
            raise UnknownClipError(error.number, error.key, error.clip_id, f"{path}:{line}") from None
        write_cache(folder, built, key_parts)
        console.print(f"tokenised {len(built):,} {split} examples once into {folder} ({time.time() - started:.1f} s);"
                      " every later run, rank and worker maps it")
    cached = open_cache(folder, key_parts)
    assert cached is not None, "a cache just written opens"
    return cached


def write_cache(folder: Path, examples: TokenizedExamples, key_parts: dict) -> None:
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    checksums = {}
    for name in ARRAYS:
        with open(partial / f"{name}.npy", "wb") as handle:
            np.save(handle, getattr(examples, name))
        checksums[name] = _crc32c(partial / f"{name}.npy")
    write_json_atomic(partial / "meta.json", {"key": key_parts, "examples": len(examples),
                                              "skipped": examples.skipped, "crc32c": checksums})
    os.replace(partial, folder)


def open_cache(folder: Path, key_parts: dict, quiet: bool = False) -> TokenizedExamples | None:
    """The cache in `folder` if it is complete, made from `key_parts` and undamaged; else None (with a word)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    damaged = [name for name in ARRAYS if meta.get("crc32c", {}).get(name) != _crc32c(folder / f"{name}.npy")]
    if meta.get("key") != key_parts or damaged:
        if not quiet:
            why = f"{', '.join(damaged)} damaged" if damaged else "made from other inputs"
            console.print(f"[yellow]tokenised-example cache {folder} is {why}; rebuilding it")
        return None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    return TokenizedExamples(**arrays, skipped=meta["skipped"])


def _crc32c(path: Path) -> int | None:
    try:
        with open(path, "rb") as handle:
            checksum = google_crc32c.Checksum()
            while chunk := handle.read(1 << 22):
                checksum.update(chunk)
        return int.from_bytes(checksum.digest(), "big")
    except OSError:
        return None


class held_lock:
    """Hold an exclusive flock on the file `path`, waiting while another process holds it. The kernel releases a
    flock when its process dies, so a crashed builder never leaves a lock behind for the next run to wait on."""

    def __init__(self, path: Path, wait_seconds: float = 3600.0) -> None:
        self.path, self.wait_seconds = path, wait_seconds

    def __enter__(self) -> held_lock:
        self.descriptor = os.open(self.path, os.O_CREAT | os.O_RDWR)
        deadline, told = time.time() + self.wait_seconds, False
        while True:
            try:
                fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                pass
            if not told:
                console.print(f"waiting for another process to tokenise the examples (it holds {self.path})")
                told = True
            if time.time() > deadline:
                os.close(self.descriptor)
                raise TimeoutError(f"another process has held {self.path} for {self.wait_seconds:.0f} s; stop it "
                                   "or wait for it, then rerun")
            time.sleep(0.2)

    def __exit__(self, *exc_info) -> None:
        os.close(self.descriptor)  # releases the flock; the file stays (removing it would race with a waiter)

