"""The later V4 releases: 0731-style checkpoints (DSpark draft under mtp.0..2) load, their backbone
matches transformers (which ignores mtp.*), the release is named, and bad layouts are clear errors."""

import re

import pytest
import torch
from conftest import rel_err, token_ids
from reference import hf_logits, hf_model
from release_writer import dspark_config, write_release

import dsv4
from dsv4.checkpoint import Checkpoint, CheckpointError
from dsv4.config import ModelConfig


@pytest.fixture(scope="module")
def release_0731(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_0731")
    raw = dspark_config()
    return path, raw, write_release(path, raw)


def test_config_reads_dspark_keys():
    cfg = ModelConfig.from_dict(dspark_config())
    assert cfg.dspark and cfg.dspark_block_size == 5 and cfg.dspark_noise_token_id == 300
    assert cfg.dspark_target_layer_ids == (1, 2, 3) and cfg.dspark_markov_rank == 16
    assert cfg.compress_ratios == (0, 4, 128, 4) and cfg.draft_compress_ratios == (0, 0, 0)
    assert cfg.n_mtp_layers == 1  # the release's config still says 1; the stages are counted from tensors
    assert not ModelConfig.from_dict({k: v for k, v in dspark_config().items() if not k.startswith("dspark")}).dspark


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"dspark_target_layer_ids": [1, 4]}, r"dspark_target_layer_ids \[1, 4\] must name layers in \[0, 4\)"),
        ({"dspark_target_layer_ids": "last"}, "must be a list of integers"),
        ({"dspark_noise_token_id": 320}, "dspark_noise_token_id 320 is outside the vocabulary"),
        ({"dspark_markov_rank": 0}, "dspark_markov_rank must be >= 1"),
    ],
)
def test_bad_dspark_config(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(dspark_config(**bad))


def test_backbone_matches_transformers(release_0731):
    path, raw, tensors = release_0731
    ids = token_ids(150, raw["vocab_size"], seed=5)
    m = dsv4.load(path, dtype=torch.float32)
    err = rel_err(m.logits(ids), hf_logits(hf_model(raw, tensors), ids))
    assert err.max() <= 1e-4, f"max rel err {err.max():.2e}"


def test_release_named(release_0731, tiny_ckpt):
    path, raw, _ = release_0731
    rel = Checkpoint(path).release(ModelConfig.from_dict(raw))
    assert (rel.name, rel.draft, rel.dspark_stages, rel.naming, rel.chat) == ("0731", "dspark", 3, "official", "0731")
    assert rel.describe() == "V4 0731-style (3-stage DSpark draft)"
    prev = tiny_ckpt("flash")
    rel = Checkpoint(prev.path).release(ModelConfig.from_dict(prev.raw))
    assert (rel.name, rel.draft, rel.chat) == ("preview", "mtp", "preview")
    assert dsv4.load(path).model.release.name == "0731"


def test_transformers_export_of_0731(release_0731, tmp_path):
    """save_pretrained keeps the dspark_* config keys but drops mtp.*: a 0731 backbone without draft."""
    path, raw, tensors = release_0731
    ref = hf_model(raw, tensors)
    ref.save_pretrained(tmp_path)
    rel = Checkpoint(tmp_path).release(ModelConfig.from_file(tmp_path))
    assert (rel.name, rel.draft, rel.naming) == ("0731", None, "transformers")
    ids = token_ids(40, raw["vocab_size"], seed=2)
    assert rel_err(dsv4.load(tmp_path, dtype=torch.float32).logits(ids), hf_logits(ref, ids)).max() <= 1e-4


def _broken(tmp_path, edit, raw=None, draft="dspark"):
    path = tmp_path / "broken"
    write_release(path, raw or dspark_config(), draft=draft, edit=edit)
    return path


def test_misshaped_dspark_tensor(tmp_path):
    name = "mtp.2.markov_head.markov_w2.weight"
    path = _broken(tmp_path, lambda t: t.update({name: torch.zeros(320, 8, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}'.*expected shape \[320, 16\].*found.*\[320, 8\]"):
        dsv4.load(path)


def test_misshaped_main_proj_scale(tmp_path):
    path = _broken(tmp_path, lambda t: t.update({"mtp.0.main_proj.scale": t["mtp.0.main_proj.scale"][:, :1]}))
    with pytest.raises(CheckpointError, match=r"scale 'mtp\.0\.main_proj\.scale'.*expected.*\[1, 2\].*found.*\[1, 1\]"):
        dsv4.load(path)


def test_mixed_layout(tmp_path):
    path = _broken(tmp_path, lambda t: t.update({"mtp.1.e_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"'mtp\.0\.main_norm\.weight' belongs to a DSpark draft but "
                                              r"'mtp\.1\.e_proj\.weight'.*mixed layout; expected the preview's MTP.*or a DSpark"):  # fmt: skip
        dsv4.load(path)


def test_dspark_tensors_without_dspark_config(tmp_path):
    raw = {k: v for k, v in dspark_config().items() if not k.startswith("dspark")}
    raw["dspark_target_layer_ids"] = [1, 2, 3]  # the writer needs it; block size 0 means no draft declared
    raw["dspark_markov_rank"] = 16
    path = _broken(tmp_path, None, raw=raw)
    with pytest.raises(CheckpointError, match=r"'mtp\.0\.main_norm\.weight' belongs to a DSpark draft, but config\.json has no"):
        dsv4.load(path)


def test_mtp_tensors_with_dspark_config(tmp_path):
    path = _broken(tmp_path, None, draft="mtp")
    with pytest.raises(CheckpointError, match=r"'mtp\.0\.e_proj\.weight' belongs to the preview's MTP layer, but "
                                              r"config\.json declares a DSpark draft"):  # fmt: skip
        dsv4.load(path)


def test_unknown_draft_layout(tmp_path):
    path = _broken(tmp_path, lambda t: t.update({"mtp.x.norm.weight": torch.ones(64, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"'mtp\.x\.norm\.weight' matches no known draft layout; expected"):
        dsv4.load(path)


def test_missing_stage(tmp_path):
    path = _broken(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.1.")])
    with pytest.raises(CheckpointError, match=r"stages \[0, 2\] but no mtp\.1\.\* tensors"):
        dsv4.load(path)


def test_stage_count_against_config(tmp_path):
    raw = dspark_config(compress_ratios=[0, 4, 128, 4, 0, 0, 0, 0])
    path = tmp_path / "four"
    write_release(path, raw, stages=3)
    with pytest.raises(CheckpointError, match=r"compress_ratios list 4 draft stages.*holds 3"):
        dsv4.load(path)


def test_inspect_names_the_release(release_0731):
    from dsv4.inspect import render

    path, raw, _ = release_0731
    text = render(Checkpoint(path), ModelConfig.from_dict(raw))
    assert "release      V4 0731-style (3-stage DSpark draft); chat format 0731" in text
    assert "(+ DSpark draft " in text


def test_shipped_encoder_decides_the_chat_format(tmp_path):
    """A DSpark checkpoint is 0731-style unless its folder ships the preview's encoder (a -DSpark repo);
    the 0731 encoder is told by its REASONING_EFFORT_PROMPTS table, as SGLang tells them apart. The
    engine renders in the detected format unless told otherwise."""
    from dsv4.chat import REASONING_EFFORT_0731_MAX, REASONING_EFFORT_MAX

    raw = dspark_config()
    write_release(tmp_path, raw)
    (tmp_path / "encoding").mkdir()
    encoder = tmp_path / "encoding" / "encoding_dsv4.py"
    cfg = ModelConfig.from_dict(raw)
    encoder.write_text('REASONING_EFFORT_MAX = (\n    "Reasoning Effort: Absolute maximum ..."\n)\n')
    rel = Checkpoint(tmp_path).release(cfg)
    assert (rel.name, rel.chat) == ("dspark", "preview")
    encoder.write_text('REASONING_EFFORT_PROMPTS = {\n    "low": "",\n}\nDEFAULT_REASONING_EFFORT = "low"\n')
    rel = Checkpoint(tmp_path).release(cfg)
    assert (rel.name, rel.chat) == ("0731", "0731")

    m = dsv4.load(tmp_path, dtype=torch.float32)
    user = [{"role": "user", "content": "test"}]
    text = lambda: m.tokenizer.decode(m.encode(user, thinking_mode="thinking", reasoning_effort="max"))  # noqa: E731
    assert m.chat_format == "0731" and REASONING_EFFORT_0731_MAX in text()
    m.chat_format = "preview"
    assert REASONING_EFFORT_MAX in text() and REASONING_EFFORT_0731_MAX not in text()
    m.chat_format = None
    assert m.chat_format == "0731"
    with pytest.raises(ValueError, match="chat format 'v9'"):
        m.chat_format = "v9"


def test_preview_with_mxfp4_experts_matches_transformers(tmp_path):
    """The preview layout (MTP layer) with MXFP4 routed experts, written by a writer sharing no code with
    dsv4 (its own E2M1 table, e8m0 scale rule and nibble order, from the OCP MX spec): dsv4's logits are
    transformers' on the values the writer says it stored."""
    raw = {k: v for k, v in dspark_config().items() if not k.startswith("dspark_")}
    raw["compress_ratios"] = raw["compress_ratios"][: raw["num_hidden_layers"] + 1]
    tensors = write_release(tmp_path, raw, draft="mtp", seed=3)
    assert Checkpoint(tmp_path).entries["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    ids = token_ids(150, raw["vocab_size"], seed=6)
    err = rel_err(dsv4.load(tmp_path, dtype=torch.float32).logits(ids), hf_logits(hf_model(raw, tensors), ids))
    assert err.max() <= 1e-4, f"max rel err {err.max():.2e}"
