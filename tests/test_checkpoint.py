"""Bad checkpoints stop loading before any compute, with errors that name the tensor and the file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4
from dsv4.checkpoint import Checkpoint, CheckpointError


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the flash tiny checkpoint that a test may break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt("flash").path, dst)
    return dst


def _edit(path, name, fn):
    """Apply fn(dict of the shard holding `name`) and rewrite that shard and the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    fname = index["weight_map"][name]
    tensors = load_file(str(path / fname))
    fn(tensors)
    save_file(tensors, str(path / fname))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != fname}
    index["weight_map"].update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return fname


def test_missing_tensor(ckpt):
    _edit(ckpt, "layers.1.attn.wkv.weight", lambda t: t.pop("layers.1.attn.wkv.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.attn\.wkv\.weight'.*shape \[96, 64\]"):
        dsv4.load(ckpt)


def test_unexpected_tensor(ckpt):
    fname = _edit(ckpt, "norm.weight", lambda t: t.update({"layers.9.attn.wkv.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor 'layers\.9\.attn\.wkv\.weight'.*{fname}"):
        dsv4.load(ckpt)


def test_wrong_shape(ckpt):
    name = "layers.2.attn.compressor.ape"
    fname = _edit(ckpt, name, lambda t: t.update({name: torch.zeros(3, 96)}))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*{fname}.*expected.*\[128, 96\].*found.*\[3, 96\]"):
        dsv4.load(ckpt)


def test_wrong_dtype(ckpt):
    name = "layers.0.ffn.gate.tid2eid"
    _edit(ckpt, name, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=r"tid2eid.*expected.*int64/int32.*found torch.float32"):
        dsv4.load(ckpt)


def test_quantized_weight_without_scale(ckpt):
    name = "layers.3.attn.wq_a.scale"
    _edit(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"wq_a.*quantized.*scale 'layers\.3\.attn\.wq_a\.scale' is missing"):
        dsv4.load(ckpt)


def test_bad_fp4_packing(ckpt):
    name = "layers.2.ffn.experts.5.w2.weight"
    _edit(ckpt, name, lambda t: t.update({name: torch.zeros(64, 64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"experts\.5\.w2.*packed shape \[64, 32\].*found \[64, 64\]"):
        dsv4.load(ckpt)


def test_missing_shard(ckpt):
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard.name}.*missing"):
        dsv4.load(ckpt)


def test_truncated_shard(ckpt):
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name}"):
        dsv4.load(ckpt)
    # cut short after opening (a copy still being written, a disk error): the read says so
    shard.write_bytes(data)
    ck = Checkpoint(ckpt)
    last = max((n for n in ck.names() if ck.location(n)[0] == shard), key=lambda n: ck.location(n)[1])
    shard.write_bytes(data[: ck.location(last)[1] + 1])
    with pytest.raises(CheckpointError, match=rf"{shard.name} changed after the checkpoint was opened"):
        ck.tensor(last)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        dsv4.load(ckpt)


def test_reads_are_lazy(tiny_ckpt):
    """Opening a checkpoint reads headers only; a tensor read returns just that tensor."""
    ck = Checkpoint(tiny_ckpt("flash").path)
    w = ck.weight("layers.1.ffn.experts.3.w1", torch.float32)
    assert type(w).__name__ == "MXFP4" and w.shape == (64, 64)
    assert type(ck.weight("layers.1.attn.wq_b", torch.float32)).__name__ == "FP8Block"
    assert ck.tensor("layers.0.ffn.gate.tid2eid").dtype == torch.int64


def test_single_file_unindexed(tiny_ckpt, tmp_path):
    """A checkpoint as one unindexed safetensors file loads the same."""
    src = tiny_ckpt("small").path
    merged = {}
    for f in src.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    save_file(merged, str(tmp_path / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    ids = [5, 6, 7, 8, 9]
    a = dsv4.load(tmp_path, dtype=torch.float32).logits(ids)
    b = dsv4.load(src, dtype=torch.float32).logits(ids)
    assert torch.equal(a, b)
