"""Training (dsv4.train): the loss falls on a toy corpus, a resumed run retraces the uninterrupted one,
the router-bias rule balances expert load, the export loads, and the bundled demo model continues a
fixed prompt as recorded. A DSpark draft trained on a frozen backbone lowers its loss, its export shares
the backbone's files, and DSpark greedy decoding equals plain greedy (the bundled demo-dspark too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.chat import ASSISTANT, USER
from dsv4.model import MoE
from dsv4.tokenizer import Tokenizer
from dsv4.train import (
    LoadMeter,
    TrainOptions,
    batch_loss,
    build_model,
    preset_config,
    train,
    update_router_bias,
)
from dsv4.train.dspark import DSparkOptions, train_dspark
from dsv4.train.plot import plot_loss

DEMO = Path(dsv4.__file__).parent / "demo"
DEMO_DSPARK = Path(dsv4.__file__).parent / "demo-dspark"
DEMO_PROMPT = "def fibonacci(n):"
# greedy fp32 continuation of BOS + DEMO_PROMPT by the bundled model, recorded after its export:
# '\n    """Return the test.  This is a list of' (top-1 leads top-2 by >= 0.14 logits at every step)
DEMO_GREEDY = [280, 433, 1092, 335, 347, 16, 223, 1082, 366, 319, 774, 449]


def _write_corpus(root: Path) -> Path:
    """A few small deterministic Python modules: enough text for a toy tokenizer and model."""
    root.mkdir()
    for m in range(6):
        lines = [f'"""Module {m}."""', "", "import math", ""]
        for j in range(12):
            lines += [
                f"def f{m}_{j}(x, y={j}):",
                f"    total = x * {j + m} + y",
                "    return math.sqrt(abs(total))",
                "",
            ]
        (root / f"mod{m}.py").write_text("\n".join(lines))
    return root


def _opts(tmp: Path, corpus: Path, **kw) -> TrainOptions:
    base = dict(data=[str(corpus)], out=str(tmp), config="toy", steps=10, seq_len=32, batch=4, warmup=2,
                lr=3e-3, min_lr=3e-4, seed=0, threads=1, eval_tokens=0, log_every=1000)  # fmt: skip
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and train() sets the count; restore it afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("data") / "corpus")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus) -> dict:
    out = tmp_path_factory.mktemp("full")
    return {"out": out, **train(_opts(out, corpus))}


def test_loss_falls(full_run):
    losses = [r["loss"] for r in full_run["history"]]
    assert len(losses) == 10
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses


def test_resume_retraces_the_uninterrupted_run(tmp_path, corpus, full_run):
    first = train(_opts(tmp_path, corpus, stop_at=4))
    assert len(first["history"]) == 4 and not (tmp_path / "model").exists()
    resumed = train(_opts(tmp_path, corpus, resume=str(tmp_path / "train_state.pt")))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full_run["history"]]
    a = torch.load(full_run["out"] / "train_state.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "train_state.pt", weights_only=True)["weights"]
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_export_loads_with_tokenizer(full_run):
    model_dir = Path(full_run["model"])
    tok = Tokenizer.from_dir(model_dir)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert len(tok.encode(f"{USER}x = 1{ASSISTANT}")) == len(tok.encode("x = 1")) + 2
    engine = dsv4.load(model_dir, dtype=torch.float32)
    logits = engine.logits(tok.encode("def f(x):\n", add_special_tokens=True))
    assert logits.shape[-1] == tok.vocab_size and torch.isfinite(logits).all()


def test_router_bias_update_balances_load():
    update = [torch.zeros(3)]
    update_router_bias(update, [torch.tensor([6.0, 3.0, 0.0])], 0.1)
    assert update[0].tolist() == pytest.approx([-0.1, 0.0, 0.1])

    model, _ = build_model(preset_config("toy", 320), seed=0)
    meter = LoadMeter(model)
    for m in meter.moes:  # start badly skewed: two experts take every token
        m.bias.data[:2] += 2.0
    ids = torch.randint(3, 320, (4, 66), generator=torch.Generator().manual_seed(0)).tolist()

    def imbalance() -> float:
        with torch.no_grad():
            batch_loss(model, ids, 0.3)  # main layers and the MTP block
        loads = torch.stack(meter.counts)
        return float((loads.max(dim=1).values / loads.mean(dim=1)).mean())

    before = imbalance()
    for _ in range(60):
        meter.update_biases(0.05)
        imbalance()
    after = imbalance()
    assert isinstance(meter.moes[0], MoE) and len(meter.moes) == 3  # layers 2, 3 and the MTP block
    assert before > 3.0 and after < 0.6 * before, (before, after)


def test_demo_model_continues_prompt_as_recorded():
    engine = dsv4.load(DEMO, dtype=torch.float32)
    tok = Tokenizer.from_dir(DEMO)
    ids = tok.encode(DEMO_PROMPT, add_special_tokens=True)
    state, out = engine.new_state(), []
    logits = engine.step([ids], [state])[0]
    for _ in range(12):
        out.append(int(logits[-1].argmax()))
        logits = engine.step([[out[-1]]], [state])[0]
    assert out == DEMO_GREEDY, (out, tok.decode(out))


def test_loss_curve_with_matplotlib_or_a_note(full_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert (full_run["out"] / "loss.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: skipped, with one line
    assert plot_loss(full_run["history"], tmp_path / "loss") is None
    assert not (tmp_path / "loss.png").exists()
    assert capsys.readouterr().err.count("\n") == 1


@pytest.fixture(scope="module")
def dspark_run(tmp_path_factory, corpus, full_run) -> dict:
    out = tmp_path_factory.mktemp("dspark")
    opts = DSparkOptions(backbone=full_run["model"], data=[str(corpus)], out=str(out), steps=12, seq_len=32,
                         batch=2, anchors=8, rank=16, warmup=2, lr=3e-3, eval_windows=0, log_every=1000)  # fmt: skip
    return train_dspark(opts)


def test_dspark_draft_loss_falls(dspark_run):
    ce = [r["ce"] for r in dspark_run["history"]]
    assert sum(ce[-3:]) / 3 < sum(ce[:3]) / 3 - 0.5, ce


def _greedy_both_ways(model_dir: Path, prompts: list[str], n: int) -> dsv4.Engine:
    engine = dsv4.load(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_dir(model_dir)
    assert engine.model.dspark is not None
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=True)
        plain = engine.generate(ids, max_tokens=n, temperature=0)
        assert engine.generate(ids, max_tokens=n, temperature=0, speculative=True) == plain, p
    return engine


def test_dspark_export_shares_the_backbone_and_speculates_as_greedy(dspark_run, full_run):
    folder, backbone = Path(dspark_run["model"]), Path(full_run["model"])
    assert [f.name for f in folder.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    # no copy of the backbone's tokenizer: it is found through the index (the official one would not fit)
    assert not (folder / "tokenizer.json").exists()
    text = "def f(x):\n    return x"
    assert Tokenizer.from_dir(folder).encode(text) == Tokenizer.from_dir(backbone).encode(text)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name, fname in weight_map.items():  # the backbone's tensors stay in its own shards
        assert (folder / fname).resolve().parent == (
            backbone if not name.startswith("mtp.") else folder
        ).resolve()
    _greedy_both_ways(folder, ["def f(x):\n", "import math\n\n"], 12)


def test_bundled_dspark_demo_runs_with_the_backbones_tokenizer():
    """dsv4/demo-dspark holds no tokenizer.json: `dsv4 run` finds ../demo's through the index (the
    official fallback's 129k ids would not fit the 4096-token vocabulary) and decodes what demo does."""
    assert not (DEMO_DSPARK / "tokenizer.json").exists()
    outs = []
    for model in (DEMO_DSPARK, DEMO):
        r = subprocess.run([sys.executable, "-m", "dsv4", "run", "--model", str(model), "--raw", "--dtype", "fp32",
                            "--temperature", "0", "--max-tokens", "12", "--quiet", DEMO_PROMPT],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] == DEMO_PROMPT + Tokenizer.from_dir(DEMO).decode(DEMO_GREEDY) + "\n", outs


def test_bundled_dspark_demo_drafts_what_the_backbone_says():
    engine = _greedy_both_ways(DEMO_DSPARK, [DEMO_PROMPT, "class Stack:\n    def push(self, item):\n"], 40)
    spec = engine.stats()["speculative"]
    assert spec["acceptance_rate"] > 0.2 and spec["mean_accepted_length"] > 2.0, spec


def test_speculation_declined_under_a_ram_budget():
    """The measured default: drafts only with every expert resident; "always" overrides."""
    tok = Tokenizer.from_dir(DEMO_DSPARK)
    ids = tok.encode(DEMO_PROMPT, add_special_tokens=True)
    engine = dsv4.load(DEMO_DSPARK, dtype=torch.float32, max_ram="2G")
    plain = engine.generate(ids, max_tokens=12, temperature=0)
    assert engine.generate(ids, max_tokens=12, temperature=0, speculative=True) == plain
    stats = engine.stats()
    assert "RAM budget" in stats["speculation_declined"] and "speculative" not in stats
    assert engine.generate(ids, max_tokens=12, temperature=0, speculative="always") == plain
    assert engine.stats()["speculative"]["rounds"] > 0


def test_scheduler_declines_speculation_under_a_ram_budget():
    """The batching scheduler (the server's path) follows the same measured default."""
    from dsv4.generate import Scheduler
    from dsv4.sampling import SamplingParams

    tok = Tokenizer.from_dir(DEMO_DSPARK)
    ids = tok.encode(DEMO_PROMPT, add_special_tokens=True)
    engine = dsv4.load(DEMO_DSPARK, dtype=torch.float32, max_ram="2G")
    sched = Scheduler(engine)
    seqs = [
        engine.sequence(ids, SamplingParams.of(max_tokens=8, temperature=0), speculative=s)
        for s in (True, "always")
    ]
    for s in seqs:
        sched.add(s)
    for _ in sched.run():
        pass
    assert seqs[0].output == seqs[1].output == engine.generate(ids, max_tokens=8, temperature=0)
    assert sched.fallbacks["ram_budget"] > 0 and seqs[0].stats.draft_rounds == 0 < seqs[1].stats.draft_rounds
