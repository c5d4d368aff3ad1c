"""Logits match Hugging Face transformers' DeepseekV4ForCausalLM (fp32, dequantized weights)."""

import pytest
import torch
from conftest import CONFIGS, rel_err, token_ids
from reference import hf_logits, hf_model
from release_writer import write_release

import dsv4

TOL = 1e-4


@pytest.mark.parametrize("name,length", [("flash", 300), ("pro", 290), ("small", 150)])
def test_official_checkpoint_matches_transformers(tmp_path, name, length):
    """The checkpoint is written by tests/release_writer.py, which shares no code with dsv4 (its own
    layout table, FP8 and MXFP4 encoders from the formats' definitions): a format or layout mistake
    made alike in dsv4's reader and writer cannot pass here."""
    raw = CONFIGS[name]
    tensors = write_release(tmp_path, raw, draft="mtp", seed=len(name))
    ids = token_ids(length, raw["vocab_size"])
    ours = dsv4.load(tmp_path, dtype=torch.float32).logits(ids)
    ref = hf_logits(hf_model(raw, tensors), ids)
    err = rel_err(ours, ref)
    print(f"{name}: max {err.max():.2e} median {err.median():.2e}")
    assert ours.shape == (length, raw["vocab_size"]) and ours.dtype == torch.float32
    assert err.max() <= TOL


def test_transformers_layout_checkpoint(tiny_ckpt, tmp_path):
    """A checkpoint saved by transformers itself (its names, fused experts) loads and matches."""
    t = tiny_ckpt("flash")
    ref_model = hf_model(t.raw, t.tensors)
    ref_model.save_pretrained(tmp_path)
    ids = token_ids(260, t.raw["vocab_size"], seed=3)
    ours = dsv4.load(tmp_path, dtype=torch.float32).logits(ids)
    assert rel_err(ours, hf_logits(ref_model, ids)).max() <= TOL


def test_bf16_close_to_fp32(tiny_ckpt):
    t = tiny_ckpt("flash")
    ids = token_ids(140, t.raw["vocab_size"])
    fp32 = dsv4.load(t.path, dtype=torch.float32).logits(ids)
    bf16 = dsv4.load(t.path).logits(ids)
    assert rel_err(bf16, fp32).median() < 0.05


def test_released_numerics_round_kv_and_indexer(tiny_ckpt):
    """As-released mode differs from exact (the roundings happen) but stays close to it."""
    t = tiny_ckpt("flash")
    ids = token_ids(300, t.raw["vocab_size"])
    exact = dsv4.load(t.path, dtype=torch.float32).logits(ids)
    released = dsv4.load(t.path, dtype=torch.float32, numerics="released").logits(ids)
    err = rel_err(released, exact)
    assert err.max() > 1e-4  # the FP8/FP4 simulation changed something
    assert err.median() < 0.1
