"""Shards beyond one disk (issue 18): training and evaluation from a real S3-compatible server (moto in server
mode) and from an HTTP server on 127.0.0.1 give what the local directory gives; a changed, missing or
unreachable shard is a clear error; the ranks of a node fetch each shard once; the cache stays bounded."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
pytestmark = pytest.mark.slow


def env(**extra) -> dict:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return {**base, **extra}


class HttpShards:
    """``python -m http.server``'s handler in a thread over a copy of the shards; remembers every request."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.requests: list[str] = []
        log = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, fmt, *args):
                log.append(self.requestline)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, suffix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.requests:
            method, path, _ = line.split(" ")
            if method == "GET" and path.endswith(suffix):
                out[path] = out.get(path, 0) + 1
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (``moto_server``) on 127.0.0.1, with a bucket."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        import s3fs

        deadline = time.time() + 60
        while True:
            try:
                fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": creds["AWS_ENDPOINT_URL"]})
                fs.mkdir("cstn-test")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield creds
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train(shards_root: str, out: Path, *extra: str, **env_extra) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", "--config",
           "configs/tiny.yaml", f"data.root={shards_root}", f"train.out_dir={out}", "train.epochs=1", "train.max_steps=4",
           "train.deterministic=true", "train.eval_every_epochs=0", "log.mlflow=false", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=600)


def evaluate(shards_root: str, checkpoint: Path, out: Path, *extra: str, **env_extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/evaluate.py", "--config", "configs/tiny.yaml", f"data.root={shards_root}",
           "data.num_workers=0", "log.mlflow=false", "--checkpoint", str(checkpoint), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=600)


def weights(out: Path) -> dict:
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def metrics(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if not k.startswith("eval_time")}


@pytest.fixture(scope="module")
def local_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    res = train(str(tiny_shards), out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = evaluate(str(tiny_shards), out / "checkpoints", out / "eval")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_training_and_evaluation_from_s3_match_the_local_directory(s3, tiny_shards, local_run, tmp_path):
    for split in ("train", "test"):
        res = subprocess.run([sys.executable, "launch/upload_shards.py", "--split-dir", str(tiny_shards / split),
                              "--to", "s3://cstn-test/tiny"], cwd=ROOT, env=env(), capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    res = train("s3://cstn-test/tiny", out, f"data.cache_dir={tmp_path / 'cache'}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = weights(out), weights(local_run)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, f"training from s3:// differs from the local directory by {worst}"
    res = evaluate("s3://cstn-test/tiny", out / "checkpoints", tmp_path / "eval", f"data.cache_dir={tmp_path / 'cache2'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert metrics(tmp_path / "eval") == metrics(local_run / "eval")


def test_a_half_uploaded_split_is_never_readable(s3, tiny_shards, tmp_path):
    """A shard damaged before its upload stops the upload before the manifest goes: the split does not exist."""
    split = tmp_path / "test"
    shutil.copytree(tiny_shards / "test", split)
    tar = sorted(split.glob("*.tar"))[-1]
    data = bytearray(tar.read_bytes())
    data[3000] ^= 0xFF  # one byte inside the first image
    tar.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "launch/upload_shards.py", "--split-dir", str(split), "--to",
                          "s3://cstn-test/half"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and str(tar) in res.stderr
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
    assert not fs.exists("cstn-test/half/test/manifest.json")
    res = evaluate("s3://cstn-test/half", Path("init"), tmp_path / "eval", f"data.cache_dir={tmp_path / 'cache'}",
                   f"train.out_dir={tmp_path / 'x'}")
    assert res.returncode == 2 and "data error:" in res.stderr and "manifest.json" in res.stderr


def test_http_root_matches_local_and_each_shard_is_fetched_once_per_node(tiny_shards, local_run, tmp_path):
    """2 ranks of one node training from http:// with one cache: the same weights, and each tar GET once."""
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    server = HttpShards(served)
    try:
        out = tmp_path / "run"
        res = train(server.url, out, f"data.cache_dir={tmp_path / 'cache'}")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        gets = server.gets(".tar")
        train_tars = {f"/train/{p.name}" for p in (served / "train").glob("*.tar")}
        assert train_tars <= set(gets) and all(count == 1 for count in gets.values()), gets
    finally:
        server.stop()
    a, b = weights(out), weights(local_run)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, f"training from http:// differs from the local directory by {worst}"


@pytest.mark.parametrize("fault", ["changed", "missing", "server_gone"])
def test_http_faults_are_named_and_never_hang(tiny_shards, local_run, tmp_path, fault):
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    victim = served / "test" / "test-000001.tar"
    server = HttpShards(served)
    cache = tmp_path / "cache"
    try:
        if fault == "changed":
            data = bytearray(victim.read_bytes())
            data[2000] ^= 0xFF
            victim.write_bytes(bytes(data))
        elif fault == "missing":
            victim.unlink()
        else:
            from pipeline.remote import ShardCache

            ShardCache(server.url, cache).prepare("test")  # manifest and indexes came; the server then went away
            server.stop()
        start = time.time()
        res = evaluate(server.url, local_run / "checkpoints", tmp_path / "eval", f"data.cache_dir={cache}")
        took = time.time() - start
    finally:
        if fault != "server_gone":
            server.stop()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = [line for line in res.stderr.splitlines() if line.startswith("data error:")][-1]
    assert f"{server.url}/test/test-0000" in line
    if fault == "changed":
        manifest = json.loads((tiny_shards / "test" / "manifest.json").read_text())
        want = manifest["shards"][1]["sha256"]
        assert "fetched twice" in line and want in line
    elif fault == "missing":
        assert "does not exist" in line
    else:
        assert "cannot fetch" in line and "attempts" in line and took < 120
    assert not list(cache.rglob("*.part.*"))


def test_the_cache_stays_bounded_and_never_evicts_a_shard_being_read(tiny_shards, tmp_path):
    import fcntl

    from pipeline.remote import ShardCache

    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    server = HttpShards(served)
    try:
        manifest = json.loads((tiny_shards / "train" / "manifest.json").read_text())
        shards = [(s["name"], s["sha256"]) for s in manifest["shards"]]
        biggest = max(s["bytes"] for s in manifest["shards"])
        cache = ShardCache(server.url, tmp_path / "cache", max_bytes=2 * biggest)
        cache.prepare("train")
        held = cache.ensure("train", *shards[0])
        with open(held, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # a reader holds the first shard
            for name, sha in shards[1:]:
                cache.ensure("train", name, sha)
            tars = list((cache.dir / "train").glob("*.tar"))
            assert held in tars  # the oldest, yet held: kept
            assert sum(p.stat().st_size for p in tars) <= 3 * biggest
        assert len(shards) > 3 and len(tars) < len(shards)
    finally:
        server.stop()


def test_a_full_cache_disk_is_named(tiny_shards, local_run, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    server = HttpShards(served)
    cache = tmp_path / "cache"
    cache.mkdir()
    try:
        diskfull = str(ROOT / "tests" / "faults" / "diskfull")
        res = evaluate(server.url, local_run / "checkpoints", tmp_path / "eval", f"data.cache_dir={cache}",
                       CSTN_FAULT_DISK_DIR=str(cache), CSTN_FAULT_DISK_BYTES="200000",
                       PYTHONPATH=diskfull + os.pathsep + os.environ.get("PYTHONPATH", ""))
    finally:
        server.stop()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = [line for line in res.stderr.splitlines() if line.startswith("data error:")][-1]
    assert "no space left on the shard cache" in line and str(cache) in line
    assert not list(cache.rglob("*.part.*"))  # no partial file; the tars that did fit are whole and verified
    import hashlib

    listed = {s["name"]: s["sha256"] for s in json.loads((tiny_shards / "test" / "manifest.json").read_text())["shards"]}
    for tar in cache.rglob("*.tar"):
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == listed[tar.name]
