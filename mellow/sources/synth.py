"""The built-in synthetic "sound scenes" dataset: clips with exact ground truth, and Mellow-style tasks on them.

A scene is a short clip holding zero to four events (tone, chord, noise burst, chirp, clicks), each with a
loudness level and, for tonal events, a pitch class; events may overlap (mixtures). Because every property is
known, captions, yes/no and multiple-choice answers, the kind of a one-event clip (a closed-label task of six
labels) and two-audio comparisons are exact.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

import numpy as np

from mellow.audio.decode import encode_audio_file
from mellow.files import sha256_file
from mellow.progress import progress_bar
from mellow.sources.common import Imported
from mellow.sources.config import PrepareConfig

KINDS = ("tone", "chord", "noise burst", "chirp", "clicks")


# the closed-label task of the set: the kind of a clip with one event, or silence (declared in prepare.json)
FORMATS = (".wav", ".flac", ".mp3", ".ogg")  # the formats, rates and channel counts clips are written in
SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
LABEL_TASKS = {"sound_kind": [*KINDS, "silence"]}


SOUND_KIND_PROMPT = "What kind of sound is in the audio?"  # the labels are learnt; listing them would pad every batch


TONAL_KINDS = ("tone", "chord")


LEVELS_DBFS = {"quiet": -32.0, "moderate": -22.0, "loud": -12.0}


PITCH_HZ = {"low": 220.0, "medium": 550.0, "high": 1400.0}


NUMBER_WORDS = ("no", "one", "two", "three", "four")


KIND_WORDS = {
    "tone": ["tone", "beep", "pure tone"],
    "chord": ["chord", "harmonic chord", "cluster of notes"],
    "noise burst": ["noise burst", "burst of static", "hiss"],
    "chirp": ["chirp", "frequency sweep", "whistle-like sweep"],
    "clicks": ["series of clicks", "ticking sound", "train of clicks"],
}


LEVEL_WORDS = {"quiet": ["quiet", "soft", "faint"], "moderate": ["moderate", "medium-level", "steady"],
               "loud": ["loud", "strong", "powerful"]}


PITCH_WORDS = {"low": ["low", "low-pitched", "deep"], "medium": ["mid-pitched", "medium-pitched", "middle"],
               "high": ["high", "high-pitched", "shrill"]}


SILENCE_CAPTIONS = ["silence", "a silent recording with nothing audible", "nothing can be heard"]


# Comparisons are asked only where the answer is clear to a listener: these are the smallest differences.
MIN_LEVEL_DIFFERENCE_DB = 8.0


MIN_PITCH_RATIO = 1.8


MIN_DURATION_DIFFERENCE_S = 1.5


MIN_EVENT_COUNT_DIFFERENCE = 2


SILENT_FRACTION = 0.12


@dataclass
class Event:
    kind: str
    start: float
    duration: float
    level: str
    level_db: float
    pitch: str | None = None
    rising: bool | None = None


@dataclass
class Scene:
    id: str
    duration: float
    events: list[Event] = field(default_factory=list)

    @property
    def loudest_db(self) -> float:
        return max((event.level_db for event in self.events), default=-90.0)

    @property
    def pitch_hz(self) -> float | None:
        tonal = [PITCH_HZ[event.pitch] for event in self.events if event.pitch]
        return math.exp(sum(math.log(hz) for hz in tonal) / len(tonal)) if tonal else None

    def to_json(self) -> dict:
        return asdict(self)


def sample_scene(rng: Random, scene_id: str, max_seconds: float) -> Scene:
    """Draw a scene: duration, 0-4 events, their kinds, levels, pitches and placement."""
    duration = round(rng.uniform(1.0, max_seconds), 2)
    max_events = min(4, int(duration / 0.7))
    count = 0 if rng.random() < SILENT_FRACTION else rng.randint(1, max(1, max_events))
    scene = Scene(scene_id, duration)
    slot = duration / max(count, 1)
    for index in range(count):
        kind = rng.choice(KINDS)
        level = rng.choice(list(LEVELS_DBFS))
        event_duration = round(rng.uniform(0.25, 0.75) * slot, 3)
        start = index * slot + rng.uniform(0.0, slot - event_duration)
        overlaps = index > 0 and rng.random() < 0.2
        if overlaps:  # a mixture: this event starts inside the previous one
            previous = scene.events[-1]
            start = previous.start + previous.duration * rng.uniform(0.2, 0.6)
        scene.events.append(Event(
            kind=kind, start=round(start, 3), duration=event_duration, level=level,
            level_db=LEVELS_DBFS[level] + rng.uniform(-1.5, 1.5),
            pitch=rng.choice(list(PITCH_HZ)) if kind in TONAL_KINDS else None,
            rising=rng.random() < 0.5 if kind == "chirp" else None,
        ))
    return scene


def render_scene(scene: Scene, sample_rate: int, seed: int) -> np.ndarray:
    """Synthesise the scene as a mono float32 waveform with a faint noise floor."""
    rng = np.random.default_rng(seed)
    total = int(round(scene.duration * sample_rate))
    waveform = rng.normal(0.0, 10 ** (-70 / 20), total)
    for event in scene.events:
        start = int(event.start * sample_rate)
        length = min(int(event.duration * sample_rate), total - start)
        if length <= 0:
            continue
        t = np.arange(length) / sample_rate
        signal = _event_signal(event, t, sample_rate, rng)
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        rms = np.sqrt(np.mean(signal**2)) + 1e-12
        waveform[start : start + length] += signal / rms * 10 ** (event.level_db / 20) * fade
    return np.clip(waveform, -1.0, 1.0).astype(np.float32)


def _event_signal(event: Event, t: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    if event.kind == "tone":
        return np.sin(2 * np.pi * PITCH_HZ[event.pitch] * t)
    if event.kind == "chord":
        root = PITCH_HZ[event.pitch]
        return sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.25, 1.5))
    if event.kind == "noise burst":
        return rng.normal(0.0, 1.0, t.shape[0])
    if event.kind == "chirp":
        low, high = 300.0, 3000.0
        f0, f1 = (low, high) if event.rising else (high, low)
        rate = (f1 - f0) / max(t[-1], 1e-3)
        return np.sin(2 * np.pi * (f0 * t + 0.5 * rate * t**2))
    clicks = np.zeros_like(t)
    period = int(sample_rate / 12)
    for offset in range(0, t.shape[0], period):
        clicks[offset : offset + 40] = np.hanning(80)[40:][: clicks[offset : offset + 40].shape[0]]
    return clicks


def _event_phrase(event: Event, rng: Random, canonical: bool) -> str:
    pick = (lambda words: words[0]) if canonical else rng.choice
    kind = pick(KIND_WORDS[event.kind])
    if event.kind == "chirp":
        kind = f"{'rising' if event.rising else 'falling'} {kind}"
    pitch = f"{pick(PITCH_WORDS[event.pitch])} " if event.pitch else ""
    level = pick(LEVEL_WORDS[event.level])
    article = "an" if level[0] in "aeiou" else "a"
    return f"{article} {level} {pitch}{kind}"


def caption(scene: Scene, rng: Random, canonical: bool = False) -> str:
    """One caption; `canonical` uses the first synonym everywhere, so the training target is consistent."""
    if not scene.events:
        return SILENCE_CAPTIONS[0] if canonical else rng.choice(SILENCE_CAPTIONS)
    parts = [_event_phrase(scene.events[0], rng, canonical)]
    for previous, event in zip(scene.events, scene.events[1:]):
        together = event.start < previous.start + previous.duration
        joiner = " together with " if together else (" followed by " if canonical else rng.choice(
            [" followed by ", " and then ", ", then "]))
        parts.append(joiner + _event_phrase(event, rng, canonical))
    return "".join(parts)


def captions(scene: Scene, rng: Random, count: int = 5) -> list[str]:
    """`count` distinct-as-possible references; the first is the canonical one."""
    references = [caption(scene, rng, canonical=True)]
    for _ in range(count * 3):
        if len(references) == count:
            break
        candidate = caption(scene, rng)
        if candidate not in references:
            references.append(candidate)
    return references


def _example(task: str, subtask: str, scene1: Scene, scene2: Scene | None, prompt: str, answer: str,
             **extra: object) -> dict:
    return {"task": task, "subtask": subtask, "audio1": scene1.id, "audio2": scene2.id if scene2 else None,
            "prompt": prompt, "answer": answer, **extra}


def _multiple_choice(rng: Random, question: str, correct: str, distractors: list[str], subtask: str,
                     scene: Scene) -> dict:
    options = [correct, *distractors]
    rng.shuffle(options)
    letters = "abcd"
    listed = " ".join(f"{letters[i]}) {option}" for i, option in enumerate(options))
    # The answer is the option's text, as in MMAU; scoring also accepts a bare option letter.
    return _example("multiple_choice", subtask, scene, None, f"{question} {listed}", correct, options=options)


def single_clip_examples(scene: Scene, rng: Random) -> list[dict]:
    """Captioning, yes/no and multiple-choice examples about one clip (answers balanced where binary)."""
    references = captions(scene, rng)
    examples = [_example("caption", "caption", scene, None, "Describe the audio.", references[0],
                         references=references)]
    present = {event.kind for event in scene.events}
    absent = [kind for kind in KINDS if kind not in present]
    asked = [rng.choice(sorted(present))] if present else []
    asked += [rng.choice(absent)] if absent and (present or rng.random() < 0.5) else []
    for kind in asked:  # one kind that is there and one that is not: balanced, and binds words to sounds
        examples.append(_example("yes_no", "presence", scene, None,
                                 f"Is there a {KIND_WORDS[kind][0]} in the audio?", "yes" if kind in present else "no"))
    examples.append(_example("yes_no", "loud_event", scene, None, "Is there a loud sound in the audio?",
                             "yes" if any(e.level == "loud" for e in scene.events) else "no"))
    if not scene.events or rng.random() < SILENT_FRACTION / (1 - SILENT_FRACTION):  # balanced yes/no
        examples.append(_example("yes_no", "silence", scene, None, "Is the audio silent?",
                                 "yes" if not scene.events else "no"))
    if scene.events:
        count = len(scene.events)
        distractors = rng.sample([NUMBER_WORDS[n] for n in range(1, 5) if n != count], 3)
        examples.append(_multiple_choice(rng, "How many sound events are in the audio?", NUMBER_WORDS[count],
                                         distractors, "count", scene))
        loudest = max(scene.events, key=lambda event: event.level_db)
        runner_up = max((e.level_db for e in scene.events if e.kind != loudest.kind), default=-90.0)
        if loudest.level_db - runner_up >= MIN_LEVEL_DIFFERENCE_DB:
            distractors = rng.sample([k for k in KINDS if k != loudest.kind], 3)
            examples.append(_multiple_choice(rng, "Which kind of sound is the loudest?", loudest.kind,
                                             distractors, "loudest_kind", scene))
    if len(scene.events) <= 1:  # draws nothing from rng: the other tasks stay as they were
        answer = scene.events[0].kind if scene.events else "silence"
        examples.append(_example("sound_kind", "sound_kind", scene, None, SOUND_KIND_PROMPT, answer))
    return examples


def comparison_examples(first: Scene, second: Scene, rng: Random) -> list[dict]:
    """Two-audio examples: which is louder / higher / longer / has more events, and how they differ."""
    examples = []
    checks = [
        ("louder", "Which audio is louder, the first or the second?",
         first.loudest_db - second.loudest_db, MIN_LEVEL_DIFFERENCE_DB),
        ("longer", "Which audio is longer, the first or the second?",
         first.duration - second.duration, MIN_DURATION_DIFFERENCE_S),
        ("more_events", "Which audio contains more sound events, the first or the second?",
         len(first.events) - len(second.events), MIN_EVENT_COUNT_DIFFERENCE),
    ]
    if first.pitch_hz and second.pitch_hz:
        checks.append(("higher", "Which audio has the higher pitch, the first or the second?",
                       math.log(first.pitch_hz / second.pitch_hz), math.log(MIN_PITCH_RATIO)))
    differences = []
    for subtask, prompt, difference, minimum in checks:
        if abs(difference) >= minimum:
            answer = "first" if difference > 0 else "second"
            examples.append(_example("comparison", subtask, first, second, prompt, answer))
            differences.append(f"the {answer} audio is {subtask.replace('_', ' ')}" if subtask != "more_events"
                               else f"the {answer} audio has more events")
    if differences:
        described = " and ".join(differences)
        examples.append(_example("difference", "difference", first, second,
                                 "Describe the difference between the two audios.", described,
                                 references=[described, f"{described}.", f"in short, {described}"]))
    return examples


def generate(num_clips: int, seed: int, max_seconds: float, splits: dict[str, float],
             comparisons_per_clip: int = 2) -> tuple[list[Scene], dict[str, list[dict]], dict[str, str]]:
    """Scenes, examples per split, and the split of each clip. Pairs are drawn within a split only."""
    rng = Random(seed)
    scenes = [sample_scene(rng, f"synth-{index:06d}", max_seconds) for index in range(num_clips)]
    order = list(range(num_clips))
    rng.shuffle(order)
    clip_split: dict[str, str] = {}
    start = 0
    names = list(splits)
    for position, name in enumerate(names):
        size = num_clips - start if position == len(names) - 1 else int(round(splits[name] * num_clips))
        for index in order[start : start + size]:
            clip_split[scenes[index].id] = name
        start += size
    examples: dict[str, list[dict]] = {name: [] for name in names}
    for name in names:
        members = [scene for scene in scenes if clip_split[scene.id] == name]
        for scene in members:
            examples[name].extend(single_clip_examples(scene, rng))
        for _ in range(comparisons_per_clip * len(members) if len(members) > 1 else 0):
            first, second = rng.sample(members, 2)
            examples[name].extend(comparison_examples(first, second, rng))
        for example in examples[name]:
            example["split"] = name
    return scenes, examples, clip_split


def load(location: str, config: PrepareConfig) -> Imported:
    """`synth`: generate the scenes and write their audio into the dataset folder, in mixed formats, rates and
    channel counts."""
    splits = {"train": 1 - config.val_fraction - config.test_fraction, "val": config.val_fraction,
              "test": config.test_fraction}
    scenes, examples, clip_split = generate(config.num_clips, config.seed, config.max_seconds, splits,
                                            config.comparisons_per_clip)
    audio_dir = config.dataset_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = Random(config.seed + 1)
    layouts = [(rng.choice(FORMATS), rng.choice(SAMPLE_RATES), rng.choice((1, 2))) for _ in scenes]
    workers = config.workers or os.cpu_count() or 1
    imported = Imported(examples=examples, label_tasks=dict(LABEL_TASKS))
    with progress_bar() as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task("writing audio", total=len(scenes))
        jobs = [pool.submit(write_clip, scene, audio_dir, layout, config.seed + index)
                for index, (scene, layout) in enumerate(zip(scenes, layouts))]
        for scene, job in zip(scenes, jobs):
            imported.records.append({**job.result(), "split": clip_split[scene.id]})
            progress.advance(task)
    return imported


def write_clip(scene: Scene, audio_dir: Path, layout: tuple[str, int, int], seed: int) -> dict:
    """Render and encode one clip; an existing file from an interrupted run is rewritten (cheap, exact)."""
    suffix, sample_rate, channels = layout
    path = audio_dir / f"{scene.id}{suffix}"
    temporary = path.with_name(f".tmp-{path.name}")
    waveform = render_scene(scene, sample_rate, seed)
    encode_audio_file(waveform, sample_rate, temporary, channels)
    os.replace(temporary, path)
    status = path.stat()
    return {"id": scene.id, "path": f"audio/{path.name}", "duration": scene.duration,
            "sha256": sha256_file(path), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns,
            "sample_rate": sample_rate, "channels": channels, "scene": scene.to_json()}
