"""`mellow serve` under load: requests/s and p50 / p95 latency for 1, 4 and 16 concurrent clients, each sending
its requests one after another through the real `openai` client, against a real server process on a loopback
port. The baseline, measured in the same run, is one client (one request at a time); a second server with
--batch-size 1 shows what the shared batches add to 16 concurrent clients on their own.

    uv run python benchmarks/serve.py --model checkpoints/<run> [--requests 64] [--clients 1,4,16]

Requests: one 6 s clip (a clip of the dataset in datasets/synth if there, else a tone mixture written here) and
"Describe the audio.", greedy, max_tokens 48; --requests in all at each concurrency.
"""

from __future__ import annotations

import argparse
import base64
import glob
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from openai import OpenAI

from mellow.audio.decode import encode_audio_file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, *options: str) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mellow.cli", "serve", str(model), "--port", str(port),
                               *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server stopped: {server.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


def clips(count: int) -> list[tuple[str, str]]:
    """(base64 data, format) of `count` 6 s clips."""
    found = sorted(glob.glob("datasets/synth/audio/*.wav") + glob.glob("datasets/synth/audio/*.flac"))[:count]
    if len(found) < count:
        folder = Path(tempfile.mkdtemp(prefix="mellow-serve-bench-"))
        rate = 16000
        time_axis = np.arange(6 * rate) / rate
        for number in range(count - len(found)):
            path = folder / f"tone-{number}.wav"
            wave = 0.3 * np.sin(2 * np.pi * (220 + 55 * number) * time_axis) * (time_axis % 1.0 < 0.6)
            encode_audio_file(wave.astype(np.float32), rate, path)
            found.append(str(path))
    return [(base64.b64encode(Path(path).read_bytes()).decode(), Path(path).suffix[1:]) for path in found]


def load(port: int, name: str, audio: list[tuple[str, str]], clients: int, requests: int) -> dict:
    """Each of `clients` threads sends `requests` requests one after another; returns rps and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        for index in range(requests):
            data, fmt = audio[(number * requests + index) % len(audio)]
            started = time.perf_counter()
            answer = openai.chat.completions.create(model=name, max_tokens=48, messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
                {"type": "text", "text": "Describe the audio."}]}])
            assert answer.choices[0].message.content is not None
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / seconds,
            "p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=next(iter(sorted(Path("checkpoints").glob("quickstart*"))),
                                                            None), help="run, checkpoint or exported model")
    parser.add_argument("--requests", type=int, default=64, help="requests at each concurrency (split among the "
                                                                  "clients, at least 3 each)")
    parser.add_argument("--clients", default="1,4,16")
    arguments = parser.parse_args()
    if arguments.model is None:
        sys.exit("give --model (a run folder; `uv run mellow quickstart` makes one)")
    audio = clips(16)
    rows = []
    for label, options in (("batched", ()), ("batch size 1", ("--batch-size", "1"))):
        port = free_port()
        server = start_server(arguments.model, port, *options)
        try:
            name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            load(port, name, audio, 1, 2)  # warm-up
            counts = [int(c) for c in arguments.clients.split(",")] if label == "batched" else [max(
                int(c) for c in arguments.clients.split(","))]
            for clients in counts:
                before = httpx.get(f"http://127.0.0.1:{port}/health").json()
                # about the same number of requests at every concurrency, at least 3 per client
                row = load(port, name, audio, clients, max(3, -(-arguments.requests // clients)))
                after = httpx.get(f"http://127.0.0.1:{port}/health").json()
                row.update(server=label, mean_batch=(after["rows"] - before["rows"])
                           / max(after["steps"] - before["steps"], 1))
                rows.append(row)
                print(f"{label}: {clients} client(s), {row['requests']} requests: {row['rps']:.2f} req/s, "
                      f"p50 {row['p50'] * 1000:.0f} ms, p95 {row['p95'] * 1000:.0f} ms, rows per step "
                      f"{row['mean_batch']:.1f}", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    baseline = rows[0]["rps"]
    print("\n| server | clients | requests | req/s | × one at a time | p50 ms | p95 ms | rows per step |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['server']} | {row['clients']} | {row['requests']} | {row['rps']:.2f} | "
              f"{row['rps'] / baseline:.2f} | {row['p50'] * 1000:.0f} | {row['p95'] * 1000:.0f} | "
              f"{row['mean_batch']:.1f} |")


if __name__ == "__main__":
    main()
