"""Trainer, loss, schedule and checkpoints (tnllm/train/loop.py, tnllm/checkpoints.py)."""
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.baseline import TransformerLM
from tnllm import checkpoints as ckpt
from tnllm.train.loop import TrainConfig, Trainer, compare, lm_loss, lr_at, param_groups


def make_corpus(folder, n_docs=12, lines=40):
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        body = "".join(f"def f{d}_{i}(x):\n    return x * {i} + {d}  # line {i}\n" for i in range(lines))
        (folder / f"mod{d:02d}.py").write_text(body)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_cfg(out, corpus, **kw):
    base = dict(out_dir=str(out), preset="tiny", data=str(corpus), seq_len=32, batch_size=4, steps=6, lr=3e-3,
                min_lr=3e-4, warmup_steps=2, eval_every=3, eval_batches=2, progress=False, plot=False,
                val_fraction=0.2, device="cpu")     # CPU: bit-exact comparisons
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg):
    pass


def train_losses(history):
    return [r["loss"] for r in history if "loss" in r], [r["val_loss"] for r in history if "val_loss" in r]


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(c, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(c, 100) == pytest.approx(1e-4)


def test_param_groups_skip_norms_and_theta():
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny"))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    assert any(names[id(p)].endswith("lrpe.theta") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    t = TransformerLM(TransNormerConfig.from_preset("tiny"))
    _, nd = param_groups(t, 0.1)
    assert nd["params"] and all(p.dim() == 1 for p in nd["params"])


@pytest.mark.parametrize("arch", [TransNormerLLM, TransformerLM])
def test_chunked_loss_equals_full(arch):
    """The whole-logits loss, the checkpointed chunks and the fused head + loss (whole or chunked) agree,
    gradients of every parameter (the tied head included) too."""
    torch.manual_seed(0)
    m = arch(TransNormerConfig.from_preset("tiny"))
    batch = torch.randint(3, 259, (3, 21))
    full = lm_loss(m, batch, chunk_tokens=10_000, fused=False)
    g_full = torch.autograd.grad(full, list(m.parameters()))
    for chunk, fused in ((16, False), (10_000, True), (16, True), (7, True)):
        chunked = lm_loss(m, batch, chunk_tokens=chunk, fused=fused)
        g_chunk = torch.autograd.grad(chunked, list(m.parameters()))
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
        for a, b in zip(g_chunk, g_full):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert abs(float(full.detach()) - math.log(259)) < 0.5          # near-uniform at init


class _LargestTensor(TorchDispatchMode):
    """The largest element count any aten op returns (every allocation is some op's output); the fused
    loss's custom op is run through its kernel's body with the mode on, so its insides are recorded too."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from tnllm.ops.fused_linear_ce import op as fused_op
        if func is torch.ops.tnllm.fused_linear_cross_entropy.default:
            with self:
                out = fused_op._fused_impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_fused_training_loss_never_allocates_the_logits():
    """A training step's loss (forward and backward) through the fused path: no tensor as large as the
    [B * T, V] logits exists (the unfused path, watched the same way, does allocate them)."""
    torch.manual_seed(0)
    cfg = TransNormerConfig.from_preset("tiny", vocab_size=2048)    # V above every activation's width
    m = TransNormerLLM(cfg)
    batch = torch.randint(3, cfg.vocab_size, (4, 129))
    n, V = 4 * 128, cfg.vocab_size
    with _LargestTensor() as fused:
        lm_loss(m, batch, chunk_tokens=64, fused=True).backward()
    with _LargestTensor() as whole:
        lm_loss(m, batch, chunk_tokens=10_000, fused=False).backward()
    assert whole.largest >= n * V
    assert fused.largest < n * V // 4


def test_fused_loss_trains_as_the_unfused_one(tmp_path, corpus):
    """A few optimizer steps on the tiny preset: the fused head + loss gives the losses of the checkpointed
    chunked path (fp32 on CPU: equal to rounding)."""
    runs = {}
    for fused in (True, False):
        t = Trainer(tiny_cfg(tmp_path / f"run{fused}", corpus, steps=4, eval_every=2, loss_chunk_tokens=40,
                             fused_loss=fused, checkpoint=False), log=quiet)
        t.fit()
        runs[fused] = train_losses(t.history)
    (a, va), (b, vb) = runs[True], runs[False]
    assert len(a) == 4 and len(va) == 2
    torch.testing.assert_close(torch.tensor(a + va), torch.tensor(b + vb), rtol=1e-5, atol=1e-5)


def test_train_learns_and_writes_checkpoint(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "run", corpus, steps=40, eval_every=20, lr=1e-2, plot=True)
    s = Trainer(cfg, log=quiet).fit()
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses, vals = train_losses(rows)
    assert len(losses) == 40 and len(vals) == 2
    assert vals[-1] < vals[0] < math.log(259)
    assert s["val_ppl"] == pytest.approx(math.exp(s["val_loss"]), rel=1e-4)
    folder = ckpt.resolve_checkpoint(tmp_path / "run")
    assert folder.name == "step-0000040"
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "trainer_state.pt", "metrics.jsonl"):
        assert (folder / f).exists(), f
    assert json.loads((folder / "config.json").read_text())["arch"] == "transnormer"
    assert (tmp_path / "run/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = TransNormerLLM.from_pretrained(folder)          # the released layout loads directly
    model, tok = ckpt.load_model(tmp_path / "run")
    x = torch.randint(3, 259, (1, 17))
    assert torch.equal(again(x), model(x)) and tok.vocab_size == 259


class _Crash(Exception):
    pass


class CrashAfterSave(Trainer):
    def save(self):
        path = super().save()
        if self.step == 3:
            raise _Crash
        return path


@pytest.mark.parametrize("arch", ["transnormer", "transformer"])
def test_resume_is_bit_exact(tmp_path, corpus, arch):
    ref = Trainer(tiny_cfg(tmp_path / "ref", corpus, arch=arch), log=quiet)
    ref.fit()
    with pytest.raises(_Crash):
        CrashAfterSave(tiny_cfg(tmp_path / "cut", corpus, arch=arch, save_every=3), log=quiet).fit()
    # rows written after the checkpoint (none here) would be dropped; the log continues from step 3
    resumed = Trainer(tiny_cfg(tmp_path / "cut", corpus, arch=arch, save_every=3, resume=True), log=quiet)
    resumed.fit()
    assert train_losses(resumed.history) == train_losses(ref.history)
    assert len(train_losses(ref.history)[0]) == 6
    for a, b in zip(ref.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        Trainer(tiny_cfg(tmp_path / "none", corpus, resume=True), log=quiet).fit()
    Trainer(tiny_cfg(tmp_path / "r", corpus, steps=2), log=quiet).fit()
    with pytest.raises(ValueError, match="seq_len"):
        Trainer(tiny_cfg(tmp_path / "r", corpus, steps=4, seq_len=16, resume=True), log=quiet).fit()


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    t = Trainer(tiny_cfg(run, corpus, steps=2), log=quiet)
    t.fit()
    before = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    with torch.no_grad():
        for p in t.raw_model.parameters():
            p.add_(1.0)

    def killed(tmp):
        assert (tmp / "model.safetensors").exists()
        raise KeyboardInterrupt               # the process dies before the rename

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 5, t.raw_model, t.tokenizer, t.trainer_state(), t.metrics_file, _before_rename=killed)
    assert ckpt.resolve_checkpoint(run).name == "step-0000002"
    model, _ = ckpt.load_model(run)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a half-written folder without `latest` pointing at it is never picked, even with a higher step
    half = run / "step-0000009"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert ckpt.resolve_checkpoint(run).name == "step-0000002"
    # the next save completes and clears the leftover temp folder
    ckpt.save_checkpoint(run, 6, t.raw_model, t.tokenizer, t.trainer_state(), t.metrics_file, keep=1)
    assert ckpt.resolve_checkpoint(run).name == "step-0000006"
    assert not list(run.glob(".tmp-*"))


def test_transformer_and_bpe_checkpoint(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "tf", corpus, arch="transformer", tokenizer="bpe", bpe_vocab_size=300, steps=2)
    t = Trainer(cfg, log=quiet)
    t.fit()
    folder = ckpt.resolve_checkpoint(tmp_path / "tf")
    assert (folder / "tokenizer.json").exists()
    assert json.loads((folder / "config.json").read_text())["arch"] == "transformer"
    model, tok = ckpt.load_model(folder)
    assert isinstance(model, TransformerLM) and tok.vocab_size == model.config.vocab_size <= 300
    x = torch.randint(3, tok.vocab_size, (2, 9))
    t.raw_model.eval()
    assert torch.equal(model(x), t.raw_model(x))
    assert abs(model.num_params() - TransNormerLLM(TransNormerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size)).num_params()) / model.num_params() < 0.03     # parameter-matched


def test_compare_same_tokens(tmp_path, corpus):
    res = compare(tiny_cfg(tmp_path / "cmp", corpus, steps=3, eval_every=0), log=quiet)
    assert [r["arch"] for r in res] == ["transnormer", "transformer"]
    assert all(math.isfinite(r["val_loss"]) for r in res)
    assert (tmp_path / "cmp/transnormer/latest").exists() and (tmp_path / "cmp/transformer/latest").exists()


def test_bad_train_config(tmp_path, corpus):
    with pytest.raises(ValueError, match="unknown preset"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, preset="huge"), log=quiet).fit()
    with pytest.raises(ValueError, match="arch"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, arch="rnn"), log=quiet)
    with pytest.raises(ValueError, match="steps"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, steps=0), log=quiet)
    with pytest.raises(ValueError, match="min_lr"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, min_lr=1.0), log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_cfg(tmp_path / "a", empty), log=quiet).fit()


@pytest.mark.parametrize("arch", ["transnormer", "transformer"])
def test_compile_is_per_block_so_the_chunked_loss_path_is_compiled_too(tmp_path, corpus, arch):
    """--compile compiles every decoder block: the chunked loss (past loss_chunk_tokens) goes through
    `hidden_states`, which a whole-model `model.compile()` (the forward only) would leave eager."""
    from tnllm.compile import is_compiled
    t = Trainer(tiny_cfg(tmp_path / "run", corpus, compile=True, arch=arch), log=quiet)
    t.setup()
    assert is_compiled(t.model)
    assert getattr(t.model, "_compiled_call_impl", None) is None       # not the whole forward
    eager = Trainer(tiny_cfg(tmp_path / "run2", corpus, arch=arch), log=quiet)
    eager.setup()
    assert not is_compiled(eager.model)


def test_compile_mode_reaches_every_block_and_is_validated(tmp_path, corpus, monkeypatch):
    """``compile_mode`` is the blocks' torch.compile mode (CUDA graphs with reduce-overhead); it needs
    ``compile=True`` and a mode torch.compile knows."""
    import tnllm.compile as tc
    seen = []
    real = tc.compile_model
    monkeypatch.setattr(tc, "compile_model", lambda m, mode="default", **kw: seen.append(mode) or real(m, mode, **kw))
    t = Trainer(tiny_cfg(tmp_path / "run", corpus, compile=True, compile_mode="reduce-overhead"), log=quiet)
    t.setup()
    assert seen == ["reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, compile=True, compile_mode="turbo"), log=quiet)
    with pytest.raises(ValueError, match="needs compile=True"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, compile_mode="reduce-overhead"), log=quiet)
    with pytest.raises(ValueError, match="with pack_documents"):
        Trainer(tiny_cfg(tmp_path / "a", corpus, compile=True, compile_mode="reduce-overhead", pack_documents=True),
                log=quiet)
