"""`mellow serve`: a trained model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    POST /v1/chat/completions   OpenAI's chat format; the user message holds one or two audio parts
                                {"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}} and
                                text parts (the prompt). max_tokens, temperature / top_p (greedy by default), seed,
                                stream (server-sent events, as OpenAI streams them), and the extension field
                                `choices`: a list of answers, the one of highest log-likelihood is returned (as
                                04_eval --closed rank answers).
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...} and the batching counters (no key needed)

Audio is decoded and encoded as 01_precompute does for the model's store (the encoder must have the store's
fingerprint; the first view, cropped or padded to its clip_seconds), so an answer is the one `mellow ask` gives
for the same clip and prompt. The model decodes up to --batch-size requests together, one token of each per
step: a request joins at the next step and leaves when its answer ends (continuous batching); a greedy answer is
the same in a batch as alone. Bad input gets a 4xx with OpenAI's error body ({"error": {"message", "type",
"param", "code"}}) and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mellow.audio.decode import AudioDecodeError, declared_seconds, decode_audio
from mellow.audio.views import decode_views
from mellow.distributed import resolve_device
from mellow.evaluate.ask import encoder_of_store, generation_batch, prompt_ids
from mellow.files import read_json
from mellow.progress import console
from mellow.settings import ServeConfig
from mellow.train.checkpoint import load_trained_model
from mellow.train.runs import find_checkpoint

FORMATS = ("wav", "mp3", "flac", "ogg")  # the input_audio formats taken (ffmpeg reads the bytes, whatever they are)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request for the model, and where its answer goes (events on `queue`, sent from the model's thread)."""

    audio: torch.Tensor  # (1 or 2, T, D)
    valid: torch.Tensor  # (1 or 2,)
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    choices: list[str] | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    random: torch.Generator | None = None  # a sampled answer's own generator (from its seed)

    def send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class Running:
    """The rows being decoded together: their jobs, key/value cache, attention mask (rows left-padded), the
    position of each row's last token and that token."""

    jobs: list[Job]
    cache: object  # transformers' DynamicCache
    mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B,)
    last: torch.Tensor  # (B,)


class Engine:
    """The model, its tokenizer and its store's encoder. One thread runs the model: requests join the rows being
    decoded at the next step (their prompts computed together first) and leave when their answer ends, so a
    long answer never holds the others back (continuous batching, as vLLM does)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        model_dir = config.model
        if (model_dir / "mellow.json").is_file():
            from mellow.evaluate.export import exported_encoder, load_exported_model

            fingerprint = exported_encoder(model_dir)
            self.model, self.tokenizer = load_exported_model(model_dir, self.device)
            self.described = f"{model_dir} (exported)"
            self.name = config.name or model_dir.name
        else:
            checkpoint = find_checkpoint(model_dir, config.which)
            fingerprint = read_json(checkpoint / "trainer.json")["store_fingerprint"]
            self.model, self.tokenizer, trainer = load_trained_model(checkpoint, self.device)
            self.described = f"{checkpoint} (update {trainer['update']})"
            self.name = config.name or (model_dir.name if checkpoint != model_dir else
                                        f"{model_dir.parent.name}-{model_dir.name}")
        self.model.eval()
        self.encoder = encoder_of_store(fingerprint, str(self.device))  # its CPU threads: every core
        if self.device.type == "cpu":  # the decoder's: the rest, while the next requests' audio is encoded
            torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2) // 2))
        self.encoder_lock = threading.Lock()
        self.incoming: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.counts = {"requests": 0, "batches": 0, "steps": 0, "rows": 0}  # rows: summed over steps
        self.busy = {"audio": 0.0, "model": 0.0}  # seconds spent decoding + encoding audio, and in the model
        self.thread = threading.Thread(target=self._serve_forever, name="mellow-model", daemon=True)

    def encode(self, audios: list[tuple[bytes, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (n, T, D), valid counts (n,)) of a request's audio: each clip's length checked, then decoded
        as 01_precompute decodes it (its first view) and encoded together, as `mellow ask` does."""
        started = time.perf_counter()
        waves, fractions = [], []
        for number, (data, fmt) in enumerate(audios, 1):
            name = f"audio {number} ({fmt})"
            param = f"messages[-1].content[audio {number}]"
            try:
                seconds = declared_seconds(data, name)  # read, not decoded: a 10-minute file is not decoded whole
                if seconds is None:
                    seconds = len(decode_audio(data, self.encoder.sample_rate, name=name)) / self.encoder.sample_rate
                if seconds > self.config.max_audio_seconds:
                    raise ApiError(400, f"{name} lasts {seconds:.1f} s, over the server's limit of "
                                        f"{self.config.max_audio_seconds:g} s", param, "audio_too_long")
                wave, fraction = decode_views({"path": name}, data, self.encoder.config, 0.0,
                                              self.encoder.sample_rate)[0]
            except AudioDecodeError as error:
                raise ApiError(400, f"{name} cannot be decoded as audio: {error}", param, "invalid_audio") from None
            waves.append(wave)
            fractions.append(fraction)
        with self.encoder_lock:
            embeddings, valid = self.encoder.encode(np.stack(waves), np.array(fractions))
        self.busy["audio"] += time.perf_counter() - started
        return torch.from_numpy(embeddings).float(), torch.from_numpy(valid.astype(np.int64))

    def submit(self, job: Job) -> None:
        if job.seed is not None and job.temperature > 0:
            job.random = torch.Generator(device=self.device).manual_seed(job.seed)
        self.incoming.put(job)

    def _serve_forever(self) -> None:
        running: Running | None = None
        pending: deque[Job] = deque()
        while True:
            if running is None and not pending:  # idle: the first request waits a moment for others
                pending.append(self.incoming.get())
                deadline = time.monotonic() + self.config.batch_wait_ms / 1000
                while len(pending) < self.config.batch_size and (left := deadline - time.monotonic()) > 0:
                    try:
                        pending.append(self.incoming.get(timeout=left))
                    except queue.Empty:
                        break
            while not self.incoming.empty():
                pending.append(self.incoming.get_nowait())
            started = time.perf_counter()
            ranked = [job for job in pending if job.choices]
            for job in ranked:
                pending.remove(job)
            for first in range(0, len(ranked), self.config.batch_size):
                self._guarded(self._rank, ranked[first : first + self.config.batch_size])
            room = self.config.batch_size - (len(running.jobs) if running else 0)
            joining = [pending.popleft() for _ in range(min(room, len(pending)))]
            if joining:
                running = self._guarded(self._join, joining, running)
            if running is not None:
                running = self._guarded(self._step, running)
            self.busy["model"] += time.perf_counter() - started

    def _guarded(self, work, jobs_or_running, *more):
        """`work(...)`; if it fails, its requests (and any rows being decoded) get a 500, and the server goes on."""
        try:
            return work(jobs_or_running, *more)
        except Exception as error:  # noqa: BLE001
            failed = jobs_or_running.jobs if isinstance(jobs_or_running, Running) else list(jobs_or_running)
            failed += [job for other in more if isinstance(other, Running) for job in other.jobs]
            for job in failed:
                job.send(("error", ApiError(500, f"the model failed: {type(error).__name__}", kind="server_error")))
            return None

    @torch.inference_mode()
    def _join(self, jobs: list[Job], running: Running | None) -> Running | None:
        """Compute the prompts of `jobs` together, choose each one's first token, and add the unfinished ones to the
        rows being decoded (both sides' caches left-padded to one length)."""
        self.counts["requests"] += len(jobs)
        self.counts["batches"] += 1
        batch = generation_batch(self.tokenizer.pad_token_id, [(job.audio, job.valid, job.prompt) for job in jobs])
        embeds, mask, _, _ = self.model.build_inputs({k: v.to(self.device) for k, v in batch.items()},
                                                     for_generation=True)
        mask = mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate derives them
        out = self.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        use_cache=True, logits_to_keep=1)
        joined = self._advance(Running(jobs, out.past_key_values, mask, positions[:, -1],
                                       self._choose(out.logits[:, -1], jobs)))
        if joined is None or running is None:
            return joined or running
        return _merged(running, joined)

    @torch.inference_mode()
    def _step(self, running: Running) -> Running | None:
        """One decoding step of every row: feed each row's last token, choose the next."""
        self.counts["steps"] += 1
        self.counts["rows"] += len(running.jobs)
        running.mask = torch.cat([running.mask, running.mask.new_ones((len(running.jobs), 1))], dim=1)
        running.positions = running.positions + 1
        out = self.model.language_model(input_ids=running.last[:, None], attention_mask=running.mask,
                                        position_ids=running.positions[:, None], past_key_values=running.cache,
                                        use_cache=True, logits_to_keep=1)
        running.cache = out.past_key_values
        running.last = self._choose(out.logits[:, -1], running.jobs)
        return self._advance(running)

    def _choose(self, logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """Each row's next token: the most likely (greedy), or drawn at the job's temperature from its top_p."""
        chosen = logits.argmax(dim=-1)
        for row, job in enumerate(jobs):
            if job.temperature > 0:
                probabilities = torch.softmax(logits[row].float() / job.temperature, dim=-1)
                ordered, order = probabilities.sort(descending=True)
                ordered = ordered * (ordered.cumsum(0) - ordered < job.top_p)  # the smallest head reaching top_p
                chosen[row] = order[torch.multinomial(ordered / ordered.sum(), 1, generator=job.random)[0]]
        return chosen

    def _advance(self, running: Running) -> Running | None:
        """Give each row its newest token (a stream's next piece); finish the rows at EOS or at their max_tokens,
        and drop them from the rows being decoded."""
        eos = self.tokenizer.eos_token_id
        keep = []
        for row, (job, token) in enumerate(zip(running.jobs, running.last.tolist())):
            finish = "stop" if token == eos else None
            if finish is None:
                job.tokens.append(token)
                job.send(("tokens", list(job.tokens)))
                finish = "length" if len(job.tokens) >= job.max_tokens else None
            if finish is None:
                keep.append(row)
            else:
                job.send(("done", self.tokenizer.decode(job.tokens, skip_special_tokens=True).strip(), finish,
                          len(job.tokens)))
        if not keep:
            return None
        if len(keep) < len(running.jobs):
            rows = torch.tensor(keep, device=running.mask.device)
            running.cache.batch_select_indices(rows)
            running.jobs = [running.jobs[row] for row in keep]
            running.mask, running.positions, running.last = (running.mask[rows], running.positions[rows],
                                                             running.last[rows])
            unused = int((running.mask.sum(0) == 0).long().cumprod(0).sum())  # padding columns no row needs
            if unused:
                running.mask = running.mask[:, unused:]
                for layer in running.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        return running

    @torch.inference_mode()
    def _rank(self, jobs: list[Job]) -> None:
        """Each job's choice of highest log-likelihood (the whole answer and its EOS), all pairs in one batch."""
        self.counts["requests"] += len(jobs)
        self.counts["batches"] += 1
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        pairs = [(job, prompt_ids(self.tokenizer, choice, "") + [eos]) for job in jobs for choice in job.choices]
        width = max(len(job.prompt) + len(answer) for job, answer in pairs)
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        text_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (job, answer) in enumerate(pairs):
            text = job.prompt + answer
            input_ids[row, : len(text)] = torch.tensor(text)
            text_mask[row, : len(text)] = 1
            labels[row, len(job.prompt) : len(text)] = torch.tensor(answer)
        generation = generation_batch(pad, [(job.audio, job.valid, job.prompt) for job, _ in pairs])
        batch = {**{key: value for key, value in generation.items() if key.startswith(("audio", "has_"))},
                 "input_ids": input_ids, "text_mask": text_mask, "labels": labels}
        scores = self.model.answer_log_likelihood({k: v.to(self.device) for k, v in batch.items()}).tolist()
        start = 0
        for job in jobs:
            mine = scores[start : start + len(job.choices)]
            start += len(job.choices)
            best = job.choices[mine.index(max(mine))]
            job.send(("done", best, "stop", len(prompt_ids(self.tokenizer, best, "")),
                      dict(zip(job.choices, mine))))


def _merged(left: Running, right: Running) -> Running:
    """The rows of two batches as one: masks and caches left-padded to the longer one's length."""
    length = max(left.mask.shape[1], right.mask.shape[1])

    def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - tensor.shape[dim]
        if not missing:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for mine, theirs in zip(left.cache.layers, right.cache.layers):
        mine.keys = torch.cat([padded(mine.keys, 2), padded(theirs.keys, 2)])
        mine.values = torch.cat([padded(mine.values, 2), padded(theirs.values, 2)])
    return Running(left.jobs + right.jobs, left.cache, torch.cat([padded(left.mask, 1), padded(right.mask, 1)]),
                   torch.cat([left.positions, right.positions]), torch.cat([left.last, right.last]))


def parse_request(body: bytes, config: ServeConfig, name: str) -> dict:
    """The request's audio (bytes and format), prompt and options, checked; an ApiError naming what is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = request.get("model")
    if model != name:
        raise ApiError(404, f"the model {str(model)[:80]!r} does not exist; this server serves {name!r} (GET "
                            "/v1/models)", "model", "model_not_found")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of message objects", "messages")
    turns = [message for message in messages if message.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        raise ApiError(400, "a mellow model answers one question: send one user message (with its audio and "
                            "prompt), optionally after system messages, which are not read", "messages")
    content = turns[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise ApiError(400, "the user message's content must be a string or a list of content parts",
                       "messages[-1].content")
    texts, audios = [], []
    for part in parts:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "input_audio":
            audios.append(_audio_part(part.get("input_audio"), len(audios) + 1))
        else:
            raise ApiError(400, f"content part of type {str(part.get('type'))[:40]!r} is not supported: send text "
                                "and input_audio parts", "messages[-1].content")
    if not audios or len(audios) > 2:
        raise ApiError(400, f"send one or two input_audio parts (this request has {len(audios)})",
                       "messages[-1].content", "wrong_audio_count")
    prompt = " ".join(text.strip() for text in texts if text.strip())
    if not prompt:
        raise ApiError(400, "the user message has no text: send the prompt as a text part", "messages[-1].content")
    return {"audios": audios, "prompt": prompt, "stream": _flag(request, "stream"), **_options(request, config)}


def _audio_part(value: object, number: int) -> tuple[bytes, str]:
    param = f"messages[-1].content[audio {number}]"
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise ApiError(400, f"audio {number}: input_audio must be {{\"data\": <base64>, \"format\": \"wav\"}}", param)
    fmt = str(value.get("format", "")).lower()
    if fmt not in FORMATS:
        raise ApiError(400, f"audio {number}: format {str(value.get('format'))[:20]!r} is not supported; use one of "
                            f"{', '.join(FORMATS)}", param, "unsupported_format")
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"audio {number}: data is not base64", param, "invalid_audio") from None
    if not data:
        raise ApiError(400, f"audio {number}: data is empty", param, "invalid_audio")
    return data, fmt


def _flag(request: dict, key: str) -> bool:
    value = request.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value


def _number(request: dict, key: str, default: float, low: float, high: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number between {low:g} and {high:g} (got {str(value)[:20]})", key)
    return float(value)


def _options(request: dict, config: ServeConfig) -> dict:
    limit = config.max_tokens_limit
    tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= limit):
        raise ApiError(400, f"max_tokens must be a whole number from 1 to {limit} (got {str(tokens)[:20]})",
                       "max_tokens")
    if request.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request", "n")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be a whole number", "seed")
    choices = request.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ApiError(400, "choices (mellow's extension: the allowed answers, ranked by likelihood) must be a "
                            "list of at least two non-empty texts", "choices")
    return {"max_tokens": tokens or config.max_tokens, "temperature": _number(request, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(request, "top_p", 1.0, 1e-6, 1.0), "seed": seed, "choices": choices}


def create_app(engine: Engine, config: ServeConfig, api_key: str):
    """The FastAPI application serving `engine`."""
    decode_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="mellow-audio")

    async def lifespan(app):
        if not engine.thread.is_alive():
            engine.thread.start()
        yield
        decode_pool.shutdown(wait=False)

    app = FastAPI(title="mellow", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    def refuse(error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return refuse(error)

    @app.exception_handler(404)
    async def not_found(request: Request, error) -> JSONResponse:
        return refuse(ApiError(404, f"no such endpoint: {request.method} {request.url.path[:80]}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, error) -> JSONResponse:
        return refuse(ApiError(405, f"{request.method} is not allowed on {request.url.path[:80]}",
                               code="method_not_allowed"))

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, **engine.counts,
                "busy_seconds": {key: round(value, 3) for key, value in engine.busy.items()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": STARTED,
                                            "owned_by": "mellow"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_limited(request, int(config.max_request_mb * 1e6))
        parsed = parse_request(body, config, engine.name)
        loop = asyncio.get_running_loop()
        audio, valid = await loop.run_in_executor(decode_pool, engine.encode, parsed["audios"])
        prompt = prompt_ids(engine.tokenizer, parsed["prompt"], engine.model.prompt_suffix)
        job = Job(audio, valid, prompt, parsed["max_tokens"], parsed["temperature"], parsed["top_p"], parsed["seed"],
                  parsed["choices"], loop)
        engine.submit(job)
        identity = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if parsed["stream"]:
            return StreamingResponse(stream(job, identity, engine.name, engine.tokenizer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        event = await until_done(job)
        return completion(event, identity, engine.name, len(prompt))

    return app


STARTED = int(time.time())


async def read_limited(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes (or says it will)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is over the server's limit of {limit / 1e6:g} MB "
                              "(--max-request-mb)", code="request_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def until_done(job: Job) -> tuple:
    while True:
        event = await job.queue.get()
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            return event


def completion(event: tuple, identity: str, name: str, prompt_tokens: int) -> dict:
    """OpenAI's chat.completion object of a finished job (`mellow.choice_log_likelihoods` for ranked choices)."""
    _, text, finish, completion_tokens, *ranked = event
    return {"id": identity, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            **({"mellow": {"choice_log_likelihoods": ranked[0]}} if ranked else {})}


async def stream(job: Job, identity: str, name: str, tokenizer):
    """Server-sent events as OpenAI streams a chat completion: a first chunk with the role, then content deltas as
    the tokens come, a last chunk with the finish reason, then `data: [DONE]`. The deltas add up to the answer a
    request without stream gets."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": identity, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    while True:
        event = await job.queue.get()
        if event[0] == "error":
            yield f"data: {json.dumps(event[1].body())}\n\n"
            break
        if event[0] == "tokens":
            text = tokenizer.decode(event[1], skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd") or not text.startswith(sent):  # half a character: wait for the rest
                continue
            if len(text.rstrip()) > len(sent):  # spaces at the end wait: the answer is stripped
                delta, sent = text.rstrip()[len(sent):], text.rstrip()
                yield chunk({"content": delta})
            continue
        _, text, finish, *_ = event
        if text.startswith(sent) and len(text) > len(sent):
            yield chunk({"content": text[len(sent):]})
        yield chunk({}, finish)
        break
    yield "data: [DONE]\n\n"


def check_port(host: str, port: int) -> None:
    """A ValueError naming the option if the server could not listen on host:port (in use, or not an address of
    this machine)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(info[4])
    except OSError as error:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); another "
                         "server may hold the port: pass another --port") from None


def serve(config: ServeConfig) -> None:
    """Load the model and serve it until Ctrl-C."""
    import uvicorn

    api_key = config.api_key or os.environ.get("MELLOW_API_KEY", "")
    check_port(config.host, config.port)  # before the model loads: a port in use is said at once
    engine = Engine(config)
    app = create_app(engine, config, api_key)
    where = f"http://{config.host}:{config.port}/v1"
    console.print(f"[bold green]serving[/] {engine.name}: {engine.described}, encoder {engine.encoder.config.name}, "
                  f"on {where} ({'an API key is required' if api_key else 'no API key'}); batches of up to "
                  f"{config.batch_size}; Ctrl-C stops", highlight=False)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning: listening on {config.host} without an API key: anyone who reaches this "
                      "machine can use the model (set MELLOW_API_KEY in .env)", highlight=False)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    console.print("stopped", highlight=False)
