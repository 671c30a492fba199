"""D4RL download (common/datasets.py step 3) against a real HTTP server on 127.0.0.1 serving a generated file.

The server runs in a thread of the test process, answers Range requests like D4RL's server, can break a
connection midway, stall, or serve damaged files, and shuts itself down after SERVER_LIFETIME seconds at the
latest. Nothing here touches the network beyond the loopback interface or the real caches.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from common import datasets
from common.datasets import D4RLDownloadError, DatasetError, download_d4rl, load_dataset
from conftest import REPO, PressCtrlCWhenFinalised

SERVER_LIFETIME = 60.0
LENGTHS = (40, 30, 50)  # three episodes: terminal, timeout, terminal


def d4rl_bytes(rewards_nan: bool = False, keys: tuple[str, ...] | None = None) -> bytes:
    """A small D4RL-format hopper file (11-dim observations, 3-dim actions) with D4RL's keys."""
    rng = np.random.default_rng(0)
    n = sum(LENGTHS)
    ends = np.cumsum(LENGTHS) - 1
    arrays = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "next_observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.normal(1, 0.1, size=n).astype(np.float32),
        "terminals": np.isin(np.arange(n), ends[[0, 2]]),
        "timeouts": np.isin(np.arange(n), ends[[1]]),
        "infos/qpos": rng.normal(size=(n, 6)),
        "infos/qvel": rng.normal(size=(n, 6)),
    }
    if rewards_nan:
        arrays["rewards"][7] = np.nan
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in arrays.items():
            if keys is None or key in keys:
                f.create_dataset(key, data=value)
        f.create_dataset("metadata/algorithm", data="SAC")
    return buffer.getvalue()


PAYLOAD = d4rl_bytes()


class FakeD4RL:
    """What the handler serves and how it misbehaves; every request is logged as (path, Range header)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drops = 0  # this many responses send only `drop_after` bytes of their body, then close
        self.drop_after = 0
        self.stall = threading.Event()  # set: send half the body, then wait for `release`
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.url = ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        fake: FakeD4RL = self.server.fake
        header = self.headers.get("Range")
        fake.requests.append((self.path, header))
        body = fake.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", header)[1]) if header else 0
        if start >= len(body) > 0 and header:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if header:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if fake.drops > 0:
            fake.drops -= 1
            self.wfile.write(payload[:fake.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        if fake.stall.is_set():
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            fake.stalled.set()
            fake.release.wait(SERVER_LIFETIME)
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    fake = FakeD4RL()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = fake
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/d4rl/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    timer = threading.Timer(SERVER_LIFETIME, httpd.shutdown)  # bounded: stops by itself
    timer.daemon = True
    timer.start()
    yield fake
    fake.release.set()
    timer.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def caches(tmp_path, monkeypatch, server) -> Path:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("D4RL_DATASET_URL", server.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never send loopback requests through a proxy
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    return tmp_path


def serve(server: FakeD4RL, env_id: str = "hopper-medium-v2", body: bytes = PAYLOAD) -> str:
    name = datasets._d4rl_file_names(datasets._parse(env_id))[0]
    server.files[f"d4rl/{name}"] = body
    return name


def cli(root: Path, *args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root / "minari"), "D4RL_DATASET_DIR": str(root / "d4rl"),
           "HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "D4RL_DATASET_URL": url, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "no_proxy": "127.0.0.1,localhost"}
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    return subprocess.run([sys.executable, "-m", "common.datasets", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/d4rl/"


def test_url_and_file_names_are_d4rl_s(monkeypatch):
    assert datasets.D4RL_BASE_URL == "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
    monkeypatch.delenv("D4RL_DATASET_URL", raising=False)
    assert datasets.d4rl_url("halfcheetah-medium-replay-v2") == (datasets.D4RL_BASE_URL
                                                                 + "halfcheetah_medium_replay-v2.hdf5")
    assert datasets.d4rl_url("walker2d-medium-expert-v2").endswith("/walker2d_medium_expert-v2.hdf5")
    assert datasets.d4rl_url("hopper-random-v2").endswith("/hopper_random-v2.hdf5")
    assert len(datasets.PAPER_D4RL) == 12 and not any(n.startswith("ant") for n in datasets.PAPER_D4RL)


def test_download_then_load(caches, server):
    name = serve(server)
    data = load_dataset("hopper-medium-v2", progress=False)
    target = caches / "d4rl" / name
    assert target.read_bytes() == PAYLOAD and not list((caches / "d4rl").glob("*.part"))
    assert data.source.startswith("D4RL file, downloaded") and str(target) in data.source
    assert [len(e.rewards) for e in data.episodes] == list(LENGTHS)
    assert [bool(e.terminals[-1]) for e in data.episodes] == [True, False, True]
    assert server.requests == [(f"/d4rl/{name}", None)]
    again = load_dataset("hopper-medium-v2", progress=False)  # now on disk: no request
    assert again.source.startswith("D4RL file (") and len(server.requests) == 1


def test_broken_connection_is_resumed_with_range(caches, server):
    name = serve(server)
    server.drops, server.drop_after = 1, len(PAYLOAD) // 3
    data = load_dataset("hopper-medium-v2", progress=False)
    assert (caches / "d4rl" / name).read_bytes() == PAYLOAD  # byte-identical
    assert server.requests == [(f"/d4rl/{name}", None), (f"/d4rl/{name}", f"bytes={len(PAYLOAD) // 3}-")]
    assert data.num_steps == sum(LENGTHS)


def test_partial_file_of_an_earlier_run_is_resumed(caches, server):
    name = serve(server)
    part = caches / "d4rl" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])  # what a kill -9 or a lost connection leaves
    assert download_d4rl("hopper-medium-v2", progress=False) == caches / "d4rl" / name
    assert server.requests == [(f"/d4rl/{name}", "bytes=1000-")]
    assert (caches / "d4rl" / name).read_bytes() == PAYLOAD and not part.exists()


def test_connection_breaking_without_progress_keeps_the_part_for_later(caches, server):
    name = serve(server)
    server.drops, server.drop_after = 100, 0  # every answer closes before the first byte
    part = caches / "d4rl" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:500])
    with pytest.raises(D4RLDownloadError, match=r"broke 5 times in a row without progress .* the next attempt "
                                                r"resumes from there"):
        download_d4rl("hopper-medium-v2", progress=False)
    assert part.read_bytes() == PAYLOAD[:500] and not (caches / "d4rl" / name).exists()
    server.drops = 0
    download_d4rl("hopper-medium-v2", progress=False)
    assert (caches / "d4rl" / name).read_bytes() == PAYLOAD and server.requests[-1][1] == "bytes=500-"


def test_ctrl_c_during_download_keeps_the_part_and_the_next_run_resumes(caches, server):
    name = serve(server)
    server.stall.set()
    env = {**os.environ, "MINARI_DATASETS_PATH": str(caches / "minari"), "D4RL_DATASET_DIR": str(caches / "d4rl"),
           "HOME": str(caches / "home"), "HF_HUB_OFFLINE": "1", "D4RL_DATASET_URL": server.url,
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.Popen([sys.executable, "-m", "common.datasets", "hopper-medium-v2", "--no-progress"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = caches / "d4rl" / f"{name}.part"
    deadline = time.time() + 30
    while not (part.is_file() and part.stat().st_size == len(PAYLOAD) // 2):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Interrupted (Ctrl-C) while downloading" in err and "nothing was cached" in err, err
    assert f"kept in {part}; the next run resumes from there" in err and "Traceback" not in err, err
    assert part.stat().st_size == len(PAYLOAD) // 2 and not (caches / "d4rl" / name).exists()
    server.stall.clear()
    server.release.set()
    data = load_dataset("hopper-medium-v2", progress=False)
    assert server.requests[-1] == (f"/d4rl/{name}", f"bytes={len(PAYLOAD) // 2}-")
    assert (caches / "d4rl" / name).read_bytes() == PAYLOAD and data.num_steps == sum(LENGTHS)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-keys"])
def test_damaged_download_is_removed_with_a_clear_error(caches, server, damage):
    body = {"garbage": b"<html>not an hdf5 file</html>" * 50, "truncated": PAYLOAD[: len(PAYLOAD) // 2],
            "wrong-keys": d4rl_bytes(keys=("observations", "actions", "rewards"))}[damage]
    serve(server, body=body)
    with pytest.raises(DatasetError) as info:
        load_dataset("hopper-medium-v2", progress=False)
    msg = str(info.value)
    assert "3. D4RL download: the downloaded file is not a D4RL dataset:" in msg and "it was removed" in msg, msg
    if damage == "wrong-keys":
        assert "lacks the keys ['terminals', 'timeouts']" in msg, msg
    assert list((caches / "d4rl").iterdir()) == []  # neither the file nor a .part


def test_downloaded_file_failing_the_checks_is_removed(caches, server):
    name = serve(server, body=d4rl_bytes(rewards_nan=True))
    with pytest.raises(DatasetError, match=r"non-finite rewards .* the first is step 7"):
        load_dataset("hopper-medium-v2", progress=False)
    assert not (caches / "d4rl" / name).exists()


def test_http_error(caches, server):
    with pytest.raises(DatasetError, match=r"3\. D4RL download: .*hopper_expert-v2.hdf5 answered HTTP 404"):
        load_dataset("hopper-expert-v2", progress=False)
    assert not (caches / "d4rl").exists()
    assert server.requests == [("/d4rl/hopper_expert-v2.hdf5", None)]


def test_a_download_in_progress_elsewhere_is_waited_for(caches, server):
    """Concurrent runs (a sweep's workers) share one download: the .part file is locked while written."""
    name = serve(server)
    folder = caches / "d4rl"
    folder.mkdir()
    part = folder / f"{name}.part"
    other = open(part, "ab")  # another process, mid-download, holds the lock
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(D4RLDownloadError, match="another process is downloading"):
        download_d4rl("hopper-medium-v2", progress=False, wait=False)
    assert part.exists()  # not removed from under its owner

    def finish():  # the other process completes: renames its file into place, then releases the lock
        time.sleep(0.3)
        (folder / name).write_bytes(PAYLOAD)
        part.unlink()
        other.close()

    thread = threading.Thread(target=finish)
    thread.start()
    assert download_d4rl("hopper-medium-v2", progress=False) == folder / name
    thread.join()
    assert server.requests == [] and sorted(p.name for p in folder.iterdir()) == [name]


def test_offline_falls_through_fast_with_the_clear_message(caches, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_URL", closed_port_url())  # connection refused, as offline
    start = time.time()
    with pytest.raises(DatasetError) as info:
        load_dataset("hopper-medium-replay-v2", progress=False)
    assert time.time() - start < 3
    msg = str(info.value)
    for part in ("Could not find the offline dataset 'hopper-medium-replay-v2'", "2. on disk: no D4RL file at",
                 "3. D4RL download: http://127.0.0.1:", "hopper_medium_replay-v2.hdf5 is unreachable",
                 "4. Minari download", "5. local generation", "`python -m common.datasets hopper-medium-replay-v2`"
                 " downloads D4RL's file"):
        assert part in msg, (part, msg)
    assert not (caches / "d4rl").exists()  # offline, nothing was created

    class Generated(Exception):
        pass

    def generate(*args):
        raise Generated

    monkeypatch.setattr(datasets, "_generate_random", generate)  # random: offline goes on to generation
    start = time.time()
    with pytest.raises(Generated):
        load_dataset("hopper-random-v2", progress=False)
    assert time.time() - start < 3


def test_random_with_a_custom_size_and_ant_are_not_downloaded(caches, server, monkeypatch):
    """hopper-random-v2 (default size) is D4RL's file; a custom --generate-steps asks for a generated one; D4RL's
    ant files do not fit Ant-v5 and are never fetched."""
    serve(server, "hopper-random-v2")
    serve(server, "walker2d-random-v2")
    serve(server, "ant-medium-v2")
    generated = []
    monkeypatch.setattr(datasets, "_generate_random", lambda name, *a: generated.append(name.env_id) or 1 / 0)
    assert load_dataset("hopper-random-v2", progress=False).source.startswith("D4RL file, downloaded")
    assert generated == []
    with pytest.raises(ZeroDivisionError):
        load_dataset("walker2d-random-v2", generate_steps=3000, progress=False)
    assert generated == ["walker2d-random-v2"]
    with pytest.raises(DatasetError) as info:
        load_dataset("ant-medium-v2", progress=False)
    assert "3. D4RL download: not downloaded: D4RL's ant files have 111-dim observations" in str(info.value)
    assert [r[0] for r in server.requests] == ["/d4rl/hopper_random-v2.hdf5"]


def test_download_all_cli(caches, server):
    for env_id in ("hopper-medium-v2", "halfcheetah-medium-v2", "walker2d-medium-v2"):
        serve(server, env_id)
    first = cli(caches, "--download-all", "--kinds", "medium", "--no-progress", url=server.url)
    assert first.returncode == 0, first.stderr
    for env_id in ("hopper-medium-v2", "halfcheetah-medium-v2", "walker2d-medium-v2"):
        assert re.search(rf"fetched +{env_id}: ", first.stdout), first.stdout
    assert "3 fetched, 0 skipped, 0 failed" in first.stdout
    assert (caches / "d4rl" / "walker2d_medium-v2.hdf5").read_bytes() == PAYLOAD
    second = cli(caches, "--download-all", "--kinds", "medium", "--families", "hopper", "ant", "--no-progress",
                 url=server.url)
    assert second.returncode == 0, second.stderr
    assert re.search(r"skipped +hopper-medium-v2: already there", second.stdout), second.stdout
    assert re.search(r"skipped +ant-medium-v2: not downloaded: D4RL's ant files", second.stdout), second.stdout
    assert len(server.requests) == 3
    offline = cli(caches, "--download-all", "--no-progress", url=closed_port_url())
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert re.search(r"failed +hopper-random-v2: .* is unreachable .* offline, so the other 11 were not tried",
                     offline.stdout), offline.stdout



@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_ctrl_c_dropped_inside_a_finaliser_still_stops_the_download(caches, server, monkeypatch):
    name = serve(server)
    start_and_total = datasets._start_and_total

    def start_and_total_then_ctrl_c(response, start):
        PressCtrlCWhenFinalised()  # freed at once: the signal arrives inside __del__ and is dropped there
        return start_and_total(response, start)

    monkeypatch.setattr(datasets, "_start_and_total", start_and_total_then_ctrl_c)
    with pytest.raises(DatasetError, match=r"Interrupted \(Ctrl-C\) while downloading .* nothing was cached"):
        download_d4rl("hopper-medium-v2", progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (caches / "d4rl" / name).exists()
