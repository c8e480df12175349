"""report.html: the run's report as a page that opens from disk, with a filterable sample of examples to listen
to. Checked in a real headless Chromium (Debian's `chromium`, installed here when we are root), driven over the
DevTools protocol through --remote-debugging-pipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mellow.config import from_names
from mellow.evaluate import score
from mellow.evaluate.html_report import example_sample, markdown_to_html
from mellow.files import read_jsonl
from mellow.settings import EvalConfig, ModelConfig, TrainConfig
from mellow.train import loop

from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def evaluated_run(mel_store, tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("html-run") / "run"
    loop.run(from_names(TrainConfig, store=mel_store, dataset=tiny_dataset, run_dir=run_dir, max_updates=2,
                        batch_size=4,
                          val_every=0, save_every=2), ModelConfig(**TINY_MODEL))
    score.run(EvalConfig(run=run_dir, max_new_tokens=4, similarity=False))
    return run_dir


def test_the_page_holds_the_report_and_a_sample_with_audio_copies_and_escapes_the_data(evaluated_run):
    out = evaluated_run / "eval-test"
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h1>Evaluation of" in page
    assert '<img alt="scores.png" src="scores.png">' in page and '<img alt="loss.png" src="loss.png">' in page
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and all("://" not in link and not link.startswith("/") for link in links)  # opens from disk
    for link in links:
        assert (out / link).is_file(), link
    rows = read_jsonl(evaluated_run / "step-000002" / "eval-test" / "predictions.jsonl")
    sample = example_sample(rows)
    assert page.count('<tr class="') == len(sample) and len(sample) < len(rows)
    assert {row["task"] for row in sample} == {row["task"] for row in rows}
    assert all("cider_d" in row for row in rows if row["task"] in ("caption", "difference"))
    audio = sorted((out / "audio").glob("*.mp3"))
    clips = {clip for row in sample for clip in (row["audio1"], row.get("audio2")) if clip}
    assert len(audio) == len(clips) and all(path.read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
                                            for path in audio)
    assert "<script>alert" not in markdown_to_html("| a | <script>alert(1)</script> |\n|---|---|\n| 1 | 2 |")


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        if subprocess.run(command, env=environment, capture_output=True, timeout=900).returncode == 0 and \
                command[1] == "install":
            break
    return shutil.which("chromium")


class Browser:
    """Chromium, headless, spoken to with the DevTools protocol over its pipe (NUL-separated JSON)."""

    def __init__(self, binary: str, profile: Path) -> None:
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4, commands_read, replies_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(commands_read, 3), os.dup2(replies_write, 4)))  # the fds it reads, writes
        os.close(commands_read)
        os.close(replies_write)
        self.buffer, self.next_id, self.events = b"", 0, []
        self.session = None

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.replies, 1 << 16)
            assert chunk, "chromium closed its pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.slow
def test_the_page_loads_without_errors_plays_its_audio_and_filters_in_headless_chromium(evaluated_run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium, and it cannot be installed here (apt-get install chromium needs root)")
    browser = Browser(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable")
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=2400, deviceScaleFactor=1,
                     mobile=False)
        browser.send("Page.navigate", url=(evaluated_run / "eval-test" / "report.html").as_uri())
        browser.wait_for("Page.loadEventFired")
        durations = browser.evaluate("""(async () => {
            const durations = [];
            for (const audio of document.querySelectorAll('audio')) {
                audio.preload = 'metadata';
                durations.push(await new Promise(done => {
                    audio.addEventListener('loadedmetadata', () => done(audio.duration), {once: true});
                    audio.addEventListener('error', () => done(-1), {once: true});
                    audio.load();
                }));
            }
            return durations;
        })()""")
        rows = "Array.from(document.querySelectorAll('#examples tbody tr'))"
        total = browser.evaluate(f"{rows}.filter(row => !row.hidden).length")
        by_task = browser.evaluate(f"""(() => {{
            const select = document.querySelector('select[name=task]');
            select.value = 'caption';
            select.dispatchEvent(new Event('change'));
            const shown = {rows}.filter(row => !row.hidden);
            return [shown.length, shown.every(row => row.dataset.task === 'caption'),
                    document.getElementById('shown').textContent];
        }})()""")
        wrong = browser.evaluate(f"""(() => {{
            document.querySelector('select[name=task]').value = '';
            const select = document.querySelector('select[name=outcome]');
            select.value = 'wrong';
            select.dispatchEvent(new Event('change'));
            return {rows}.filter(row => !row.hidden).map(row => row.dataset.outcome);
        }})()""")
        browser.evaluate("document.getElementById('examples').scrollIntoView()")
        screenshot = browser.send("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "report.png").write_bytes(__import__("base64").b64decode(screenshot))
    finally:
        browser.close()
    errors = [event for event in browser.events
              if event.get("method") == "Runtime.exceptionThrown"
              or (event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] == "error")
              or (event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    assert durations and all(duration > 0 for duration in durations), durations
    assert 0 < by_task[0] < total and by_task[1] and by_task[2] == str(by_task[0])
    assert wrong and set(wrong) == {"wrong"} and len(wrong) < total
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
