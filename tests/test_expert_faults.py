"""Expert reads that fail: an I/O error, a shard cut short or replaced after loading, a vanished file.

Each gives the caller (the request) an error naming the tensor and the file, leaves nothing waiting on
the failed read (prefetches included), and the next read works again once the disk does. Every wait in
these tests has a timeout: a regression shows up as a failure, never as a hung run.
"""

import errno
import os
import re
import shutil
import threading

import httpx
import pytest
import torch
from test_server import LiveServer

import dsv4
from dsv4.checkpoint import Checkpoint, CheckpointError
from dsv4.experts import ExpertStore

L1 = "layers.1.ffn.experts"


class FailingReads:
    """Makes positioned reads of the checkpoint's shards raise EIO while `on` is set."""

    def __init__(self, monkeypatch):
        self.on = False
        real = os.preadv

        def preadv(fd, buffers, offset, *args):
            if self.on:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, buffers, offset, *args)

        monkeypatch.setattr(os, "preadv", preadv)


def finishes(fn, timeout: float = 10.0) -> bool:
    """Whether fn() returns within `timeout` seconds (it keeps running on a daemon thread if not)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint: these tests damage its files."""
    return shutil.copytree(tiny_ckpt("flash").path, tmp_path / "ckpt")


def make_store(path, experts_room: int = 8, prefetch_room: int = 2) -> ExpertStore:
    s = ExpertStore(Checkpoint(path), budget_bytes=0, dtype=torch.float32)
    one = s.expert_bytes(L1, 0)
    s.budget_bytes, s.prefetch_bytes = experts_room * one, prefetch_room * one
    return s


def test_failed_prefetch_neither_hangs_nor_shrinks_the_prefetch_budget(ckpt_copy, monkeypatch):
    s, faults = make_store(ckpt_copy), FailingReads(monkeypatch)
    faults.on = True
    s.prefetch(L1, [0, 1])
    assert finishes(s.wait), "wait() hangs after a failed prefetch"
    assert s.stats.read_errors == 2 and not s._prefetching and not s._cache
    faults.on = False
    s.prefetch(L1, [2, 3])  # the full budget of two reads is there again
    assert finishes(s.wait) and s.stats.prefetched == 4
    s.get(L1, [2, 3])
    assert s.stats.hits == 2


def test_failed_read_names_the_tensor_and_the_next_read_works(ckpt_copy, monkeypatch):
    s, faults = make_store(ckpt_copy), FailingReads(monkeypatch)
    faults.on = True
    with pytest.raises(
        CheckpointError,
        match=rf"reading '{L1}\.4\.w1\.weight' from .*safetensors failed: .*Input/output error",
    ):
        s.get(L1, [4])
    s.prefetch(L1, [4])  # a prefetch of the same expert fails too, and a request joining it gets the error
    with pytest.raises(CheckpointError, match="Input/output error"):
        s.get(L1, [4])
    assert finishes(s.wait)
    faults.on = False
    got = s.get(L1, [4])
    assert torch.equal(got[4][0].weight, Checkpoint(ckpt_copy).tensor(f"{L1}.4.w1.weight"))


def shard_of(path, name: str):
    return Checkpoint(path).location(name)[0]


def test_shard_cut_short_after_loading(ckpt_copy):
    s = make_store(ckpt_copy)
    s.get(L1, [0])  # the shard is open and read from
    shard = shard_of(ckpt_copy, f"{L1}.5.w1.weight")
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{shard.name} changed after the checkpoint was opened"):
        s.get(L1, [5])
    assert finishes(s.wait)


def test_shard_replaced_after_loading(ckpt_copy):
    """A shard swapped for another file of the same name (a new download, another model): its tensors
    sit at other offsets, so reading on would hand the model wrong bytes without a word."""
    s = make_store(ckpt_copy)
    shard = shard_of(ckpt_copy, f"{L1}.6.w1.weight")
    other = sorted(p for p in ckpt_copy.glob("*.safetensors") if p != shard)[0]
    os.replace(shutil.copy(other, ckpt_copy / "new.tmp"), shard)
    with pytest.raises(CheckpointError, match="changed after the checkpoint was opened"):
        s.get(L1, [6])


def test_vanished_shard(ckpt_copy):
    e = dsv4.load(ckpt_copy, max_ram="1G")  # loading closes the shards: expert reads open them again
    shard = shard_of(ckpt_copy, f"{L1}.7.w1.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name} failed: .*No such file"):
        e.model.store.get(L1, [7])


def test_server_fails_the_request_and_stays_healthy(ckpt_copy, monkeypatch):
    """Reads fail during a request: it gets a 500 saying what failed -- the tensor, the shard and the
    I/O error, no traceback (no hang); the server keeps serving, and once the disk reads again the same
    request gets its answer."""
    engine = dsv4.load(ckpt_copy, max_ram="1G", dtype=torch.float32)
    want = engine.generate([0, 5, 6, 7], max_tokens=4, temperature=0.0)
    engine.model.store.set_budget(0)  # every expert is read again from the disk
    faults = FailingReads(monkeypatch)
    from dsv4.server.app import create_app

    server = LiveServer(create_app(engine, model_name="tiny", max_context=256))
    try:
        body = {"model": "tiny", "prompt": [0, 5, 6, 7], "max_tokens": 4, "temperature": 0}
        faults.on = True
        bad = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error", bad.text
        reason = re.compile(r"CheckpointError: reading '(layers\.\d+\.ffn\.experts\.\d+\.w[123]\.\w+)' "
                            r"from \S+/(model-\d+-of-\d+\.safetensors) failed: \[Errno 5\] Input/output error")  # fmt: skip
        found = reason.search(bad.json()["error"]["message"])
        assert found and shard_of(ckpt_copy, found[1]).name == found[2], bad.text
        assert "Traceback" not in bad.text and "File \"" not in bad.text
        stream = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
        assert '"engine_error"' in stream.text and stream.text.endswith("data: [DONE]\n\n")
        assert reason.search(stream.text), stream.text
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        faults.on = False
        good = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert good.status_code == 200, good.text
        assert good.json()["usage"]["completion_tokens"] == len(want)
        server.wait_idle()
        assert not engine.model.store._prefetching and engine.model.store.stats.read_errors > 0
    finally:
        server.stop()
