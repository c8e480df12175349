"""`mellow serve`: a real server process on a loopback port, called with the real `openai` client (and raw HTTP
for what a client library would not send): the same answers as `mellow ask`, batches shared by concurrent
requests, streaming, ranked choices, an API key, and bad input refused with OpenAI's error body while the
server goes on serving."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from mellow.audio.decode import encode_audio_file
from mellow.config import from_names
from mellow.evaluate.ask import ask
from mellow.settings import AskConfig, ModelConfig, TrainConfig
from mellow.train import loop

from conftest import save_tiny_llama

KEY = "sk-test-6f1d0c8e2b7a4d95"
RATE = 16000


def tone(path: Path, seconds: float, hertz: float) -> Path:
    time_axis = np.arange(int(seconds * RATE)) / RATE
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_audio_file((0.3 * np.sin(2 * np.pi * hertz * time_axis)).astype(np.float32), RATE, path)
    return path


def audio_part(path: Path, fmt: str | None = None) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": fmt or path.suffix[1:]}}


def question(*parts: dict, prompt: str = "Describe the audio.") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def server(mel_store, tiny_dataset, tmp_path_factory):
    """A run of the tiny model, its server (key from MELLOW_API_KEY, audio up to 5 s, bodies up to 1 MB) and clips."""
    folder = tmp_path_factory.mktemp("serve")
    run_dir = folder / "run"
    # a random Llama with its own output layer, one update at a learning rate that leaves it as it was: answers
    # that differ from clip to clip and prompt to prompt (a briefly trained tiny model answers every clip alike)
    decoder = save_tiny_llama(folder / "decoder")
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=1,
                        batch_size=4, val_every=0, lr=1e-9), ModelConfig(decoder=f"hf:{decoder}"))
    clips = {fmt: tone(folder / f"clip-{index}.{fmt}", 2.0 + 0.25 * index, 300 + 200 * index)
             for index, fmt in enumerate(("wav", "flac", "ogg", "mp3"))}
    clips["long"] = tone(folder / "long.wav", 8.0, 500)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = folder / "server.log"
    environment = {**os.environ, "MELLOW_API_KEY": KEY}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "mellow.cli", "serve", str(run_dir), "--port", str(port),
                                    "--max-audio-seconds", "5", "--max-request-mb", "1", "--max-tokens", "8",
                                    "--batch-wait-ms", "20"], stdout=output, stderr=subprocess.STDOUT,
                                   env=environment)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, log.read_text()
        time.sleep(0.3)
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    yield {"run": run_dir, "base": base, "client": client, "clips": clips, "process": process, "log": log,
           "name": client.models.list().data[0].id}
    process.terminate()
    process.wait(30)


def test_answers_are_mellow_asks_and_a_stream_adds_up_to_them(server):
    client, clips, name = server["client"], server["clips"], server["name"]
    assert name == "run" and server["base"].startswith("http://127.0.0.1:")
    for paths, prompt in (([clips["wav"]], "Describe the audio."), ([clips["flac"], clips["mp3"]],
                                                                    "Which one is louder?")):
        reply = client.chat.completions.create(model=name, messages=question(*map(audio_part, paths), prompt=prompt))
        expected = ask(AskConfig(checkpoint=server["run"], max_new_tokens=8, device="cpu"), paths, prompt)
        assert reply.choices[0].message.content == expected and len(expected.split()) > 1
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8
        chunks = list(client.chat.completions.create(model=name, stream=True,
                                                     messages=question(*map(audio_part, paths), prompt=prompt)))
        assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 4  # token by token
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    shorter = client.chat.completions.create(model=name, max_tokens=2, messages=question(audio_part(clips["wav"])))
    assert shorter.usage.completion_tokens <= 2


def test_concurrent_requests_share_batches_and_get_their_answers_alone(server):
    client, clips, name = server["client"], server["clips"], server["name"]
    asked = [(fmt, prompt) for fmt in ("wav", "flac", "ogg", "mp3")
             for prompt in ("Describe the audio.", "Is there a tone?", "What is heard?")]

    def answer(item):
        fmt, prompt = item
        return client.chat.completions.create(model=name, messages=question(audio_part(clips[fmt]), prompt=prompt)
                                              ).choices[0].message.content

    alone = [answer(item) for item in asked]
    before = httpx.get(f"{server['base']}/health").json()
    with ThreadPoolExecutor(len(asked)) as pool:
        together = list(pool.map(answer, asked))
    after = httpx.get(f"{server['base']}/health").json()
    assert together == alone and len(set(alone)) > 3  # different answers, each the one it gets alone
    assert after["requests"] - before["requests"] == len(asked)
    assert after["batches"] - before["batches"] < len(asked)  # some requests' prompts were computed together
    assert after["rows"] - before["rows"] > 1.5 * (after["steps"] - before["steps"])  # and decoded together


def test_choices_are_ranked_and_sampling_follows_its_seed(server):
    client, clips, name = server["client"], server["clips"], server["name"]
    reply = client.chat.completions.create(model=name, messages=question(audio_part(clips["wav"]),
                                                                         prompt="Is there a tone?"),
                                           extra_body={"choices": ["yes", "no", "maybe so"]})
    ranked = reply.model_extra["mellow"]["choice_log_likelihoods"]
    assert set(ranked) == {"yes", "no", "maybe so"} and reply.choices[0].message.content == max(ranked,
                                                                                               key=ranked.get)
    sampled = [client.chat.completions.create(model=name, temperature=1.5, top_p=0.9, seed=7,
                                              messages=question(audio_part(clips["ogg"]))).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def _raw(server, body: bytes | dict, key: str | None = KEY) -> httpx.Response:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server['base']}/v1/chat/completions", content=content, headers=headers, timeout=60)


def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server):
    client, clips, name = server["client"], server["clips"], server["name"]

    def refused(error_type, code, **request):
        with pytest.raises(error_type) as caught:
            client.chat.completions.create(**{"model": name, **request})
        assert caught.value.body["code"] == code and caught.value.body["type"] == "invalid_request_error", \
            caught.value.body
        return caught.value

    not_audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"plain text, no audio " * 20)
                                                        .decode(), "format": "wav"}}
    error = refused(openai.BadRequestError, "invalid_audio", messages=question(not_audio))
    assert "cannot be decoded as audio" in error.message
    refused(openai.BadRequestError, "unsupported_format", messages=question(audio_part(clips["wav"], "aac")))
    error = refused(openai.BadRequestError, "audio_too_long", messages=question(audio_part(clips["long"])))
    assert "8.0 s" in error.message and "5 s" in error.message
    refused(openai.BadRequestError, "wrong_audio_count", messages=question(*[audio_part(clips["wav"])] * 3))
    refused(openai.BadRequestError, "wrong_audio_count", messages=question())
    refused(openai.NotFoundError, "model_not_found", messages=question(audio_part(clips["wav"])), model="gpt-4o")
    refused(openai.BadRequestError, None, messages=question(audio_part(clips["wav"])), max_tokens=100000)
    refused(openai.BadRequestError, None, messages=question(audio_part(clips["wav"])), temperature=-1)
    for body, status, code in ((b'{"model": "run", "messages": [', 400, "invalid_json"),
                               (b"\xff\xfe not json", 400, "invalid_json"),
                               ({"model": name, "messages": question(audio_part(clips["wav"])),
                                 "padding": "x" * 1_100_000}, 413, "request_too_large")):
        reply = _raw(server, body)
        assert reply.status_code == status and reply.json()["error"]["code"] == code, reply.text
    assert httpx.get(f"{server['base']}/v1/nowhere", headers={"authorization": f"Bearer {KEY}"}).status_code == 404
    reply = client.chat.completions.create(model=name, messages=question(audio_part(clips["wav"])))
    assert reply.choices[0].message.content is not None  # still serving


def test_the_api_key_is_required_and_never_shown(server):
    for key in (None, "sk-wrong"):
        reply = _raw(server, {"model": server["name"], "messages": question(audio_part(server["clips"]["wav"]))}, key)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in reply.text
    assert httpx.get(f"{server['base']}/v1/models").status_code == 401
    assert httpx.get(f"{server['base']}/health").status_code == 200  # health needs no key
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server['base']}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert KEY not in server["log"].read_text()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_a_load_with_bad_requests_mixed_in_gives_no_5xx_and_flat_memory(server):
    clips, name = server["clips"], server["name"]
    good = {"model": name, "messages": question(audio_part(clips["wav"]))}
    bad = [b"{broken", {"model": name, "messages": question(audio_part(clips["wav"], "aac"))},
           {"model": name, "messages": question(audio_part(clips["long"]))},
           {"model": "other", "messages": question(audio_part(clips["wav"]))},
           {"model": name, "messages": question({"type": "input_audio",
                                                 "input_audio": {"data": "@@@", "format": "wav"}})}]
    requests = [bad[index % len(bad)] if index % 3 == 0 else good for index in range(300)]

    def send(body) -> int:
        return _raw(server, body).status_code

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(send, requests[:100]))
        warm = _rss_mb(server["process"].pid)
        rest = list(pool.map(send, requests[100:]))
    statuses = first + rest
    assert server["process"].poll() is None
    assert all(status < 500 for status in statuses)
    assert statuses.count(200) == sum(body is good for body in requests)
    assert _rss_mb(server["process"].pid) < warm * 1.1 + 20  # 200 more requests: no growth to speak of


def test_a_port_in_use_is_said_before_the_model_loads(tmp_path):
    from mellow.evaluate.serve import check_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: cannot listen there .*pass another --port"):
            check_port("127.0.0.1", port)
    with pytest.raises(ValueError, match="--host 203.0.113.9"):
        check_port("203.0.113.9", 8000)  # an address this machine does not have
