"""The README's first command, from a clean clone, up to the dashboard answering; then Ctrl-C."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()[0].split("#")[0].strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout to clone")
def test_first_readme_command_from_a_clean_clone_serves_the_dashboard(tmp_path):
    command = readme_first_command()
    assert command == "bash scripts/setup.sh"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")}
    env.update(BOOMERANG_HOME=str(tmp_path / "home"), BOOMERANG_PORT=str(port),
               REDIS_URL="redis://127.0.0.1:6379/14", PATH=os.environ["PATH"])
    teacher_cache = Path(os.environ.get("BOOMERANG_HOME", "~/.boomerang")).expanduser() / "teachers"
    if teacher_cache.is_dir():  # the conversion itself is tested elsewhere; spare the 30 s here
        shutil.copytree(teacher_cache, tmp_path / "home" / "teachers")
    log = open(tmp_path / "setup.log", "w")
    # a terminal's Ctrl-C must work even where this test runs with SIGINT ignored (a background CI job:
    # bash cannot trap a signal ignored when it starts)
    proc = subprocess.Popen(command.split(), cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "setup.log").read_text()[-4000:]
            if "Boomerang Studio is running" in (tmp_path / "setup.log").read_text():
                break
            time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200 and b"Boomerang Studio" in r.read()
        out = (tmp_path / "setup.log").read_text()
        assert "starting a worker" in out and "the main job" in out and "job 1 queued" in out
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal goes to the whole group
        proc.wait(timeout=120)
    time.sleep(2)
    leftover = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout
    assert not leftover.strip(), "the dashboard outlived Ctrl-C"
    workers = subprocess.run(["pgrep", "-f", f"{clone}/.venv/bin/boomerang worker"], capture_output=True, text=True).stdout
    assert not workers.strip(), "the worker outlived Ctrl-C"
    assert "stopping the worker and the dashboard" in (tmp_path / "setup.log").read_text()
