"""The trainer: data -> tokenizer -> model -> AdamW + warmup/cosine -> steps with periodic validation and
atomic checkpoints; ``--resume`` continues bit-exactly on CPU.

Structure (so data/tensor parallel can be slotted in): ``Trainer(cfg, parallelize=fn, rank=r, world_size=w)``.
``parallelize(model) -> model`` runs after the model is built and moved to its device and before
compile and the optimizer; the loader keeps this rank's rows of each global batch; only ``is_main`` logs,
shows the bar and writes checkpoints; ``reduce_mean`` is the hook for averaging logged numbers over ranks.

Weight decay (0.1 by default) applies to the weights of Linear and Embedding modules (the embedding is the
tied head); norm weights, biases and LRPE's theta (a frequency, not a weight) are not decayed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TransNormerConfig
from ..data import IGNORE_INDEX, DocumentBatch, PackedLoader, corpus_texts, load_corpus, split_corpus
from .. import checkpoints as ckpt

ARCHS = ("transnormer", "transformer")


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    arch: str = "transnormer"              # or "transformer" (the Llama-style baseline, parameter-matched)
    preset: str = "demo"
    model_config: str | None = None        # a config.json path; overrides preset
    data: str | None = None                # None: the embedded Python standard library corpus
    tokenizer: str = "byte"                # "byte", "bpe" (trained on the train split) or a saved tokenizer path
    bpe_vocab_size: int = 1024
    bpe_train_bytes: int = 4_000_000
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100                  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0                    # 0: only at the end
    keep_checkpoints: int = 1
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    # the blocks' torch.compile mode: "reduce-overhead" (and "max-autotune") also replay each compiled block as a
    # CUDA graph, which removes the host's launch time from a step that the host cannot issue fast enough
    compile_mode: str = "default"
    resume: bool = False
    progress: bool = True
    plot: bool = True
    checkpoint: bool = True                # False: write no checkpoint (metrics only), e.g. for compare grids
    loss_chunk_tokens: int = 16384         # rows per chunk of the fused head + loss (or of the checkpointed path)
    fused_loss: bool = True                # head + cross entropy as tnllm.ops.fused_linear_cross_entropy
    pack_documents: bool = False           # no attention across documents inside a row (DocumentBatch)
    overrides: dict = field(default_factory=dict)   # model config fields over the preset

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("seq_len", "batch_size", "steps", "eval_batches", "keep_checkpoints", "loss_chunk_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("progress", "plot", "checkpoint", "compile", "resume", "pack_documents", "fused_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        from tnllm.compile.policy import MODES
        if self.compile_mode not in MODES:
            raise ValueError(f"compile_mode must be one of {MODES}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=True (`--compile`)")
        if self.cuda_graphs and self.pack_documents:
            raise ValueError(f"compile_mode={self.compile_mode!r} with pack_documents: each packed batch has its own "
                             "number of documents (cu_seqlens), so nearly every step would record new CUDA graphs; "
                             "use the default compile mode (or max-autotune-no-cudagraphs)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled blocks replay as CUDA graphs (the compile modes that use them)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps`` to ``lr``, then cosine to ``min_lr`` at ``steps``. step is 0-based."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay Linear/Embedding weights only (see the module docstring); tied parameters counted once."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    decay, no_decay = [], []
    for p in model.parameters():             # parameters() yields a tied tensor once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (cuda when available, else cpu), or a device name; ValueError for a device this torch
    cannot use (``cuda`` on a CPU-only build, ``cuda:3`` on a machine with two GPUs, a typo)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The head weight the fused loss can take: ``lm_head.weight`` when the model has ``head_norm`` and the
    weight is a plain tensor; None otherwise: a DTensor (tensor parallel's Replicate head, whose placements
    belong to the module's own hooks) keeps the checkpointed-chunk path. Under FSDP2 the root unit's
    weight is unsharded (a plain tensor) once ``hidden_states`` has run, so the fused path is taken there."""
    from torch.distributed.tensor import DTensor
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if not callable(getattr(model, "head_norm", None)) or not isinstance(w, torch.Tensor) or isinstance(w, DTensor):
        return None
    if getattr(head, "bias", None) is not None or type(head) is not nn.Linear or head._forward_hooks \
            or head._forward_pre_hooks:
        return None
    return w


def lm_loss(model: nn.Module, batch, chunk_tokens: int, fused: bool = True) -> torch.Tensor:
    """Mean next-token cross entropy of ``batch`` [B, T + 1], or of a ``DocumentBatch`` (documents packed into
    rows: the model runs with its ``cu_seqlens``, so no token attends across a document, and the targets that
    start another document are skipped).

    ``fused`` (and a plain ``lm_head.weight``, see :func:`fused_head_weight`): the head and the loss are one
    ``tnllm.ops.fused_linear_cross_entropy`` over ``head_norm(hidden)`` and ``lm_head.weight``, in chunks of
    ``chunk_tokens`` rows, so [B, T, V] logits never exist and the head's matmul is not recomputed.
    Otherwise: above ``chunk_tokens`` tokens the head and the loss run per chunk under activation
    checkpointing (the logits of one chunk at a time), below it on the whole logits."""
    if isinstance(batch, DocumentBatch):
        x, y, kw = batch.input_ids, batch.targets, {"cu_seqlens": batch.cu_seqlens}
        count = (y != IGNORE_INDEX).sum().clamp(min=1)            # a tensor: no host read
    else:
        x, y, kw = batch[:, :-1], batch[:, 1:], {}
        count = y.numel()
    n = y.numel()
    w = fused_head_weight(model) if fused else None
    if w is not None:
        from tnllm.ops import fused_linear_cross_entropy
        h = model.head_norm(model.hidden_states(x, **kw)).reshape(n, -1)
        total = fused_linear_cross_entropy(h, w, y.reshape(n), ignore_index=IGNORE_INDEX,
                                           chunk_tokens=min(n, chunk_tokens) if n else None, reduction="sum")
        return (total / count).float()             # fp32 as the unfused paths (fp64 models: fp64 inside)
    if n <= chunk_tokens:
        logits = model(x, **kw).float().reshape(n, -1)
        if not kw:
            return F.cross_entropy(logits, y.reshape(n))
        return F.cross_entropy(logits, y.reshape(n), ignore_index=IGNORE_INDEX, reduction="sum") / count
    from torch.utils.checkpoint import checkpoint
    h = model.hidden_states(x, **kw).reshape(n, -1)
    y = y.reshape(n)

    def piece(hc, yc):
        return F.cross_entropy(model.head(hc).float(), yc, ignore_index=IGNORE_INDEX, reduction="sum")

    total = sum(checkpoint(piece, h[i:i + chunk_tokens], y[i:i + chunk_tokens], use_reentrant=False)
                for i in range(0, n, chunk_tokens))
    return total / count


def build_model(arch: str, mcfg: TransNormerConfig):
    if arch == "transformer":
        from ..baseline import TransformerLM, matched_config
        return TransformerLM(mcfg if mcfg.extra.get("arch") == "transformer" else matched_config(mcfg))
    from ..model import TransNormerLLM
    return TransNormerLLM(mcfg)


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    def __init__(self, cfg: TrainConfig, parallelize: Callable[[nn.Module], nn.Module] | None = None,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg, self.parallelize = cfg, parallelize
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._log = log
        self.out = Path(cfg.out_dir)
        self.metrics_file = self.out / ckpt.METRICS
        self.step = 0
        self.history: list[dict] = []

    # -- logging --------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm import tqdm
            tqdm.write(msg)

    def record(self, row: dict) -> None:
        self.history.append(row)
        if self.is_main:
            with open(self.metrics_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def reduce_mean(self, value: float) -> float:
        """Average a logged number over ranks (identity on one process; the distributed trainer overrides)."""
        return value

    # -- setup ------------------------------------------------------------------------------------
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    def model_config(self, vocab_size: int) -> TransNormerConfig:
        c = self.cfg
        if c.model_config is not None:
            mcfg = TransNormerConfig.from_json(c.model_config)
            if c.overrides:
                mcfg = dataclasses.replace(mcfg, **c.overrides)
        else:
            mcfg = TransNormerConfig.from_preset(c.preset, **c.overrides)
        if mcfg.vocab_size != vocab_size:     # the tokenizer decides the vocabulary
            mcfg = dataclasses.replace(mcfg, vocab_size=vocab_size)
        return mcfg

    def build_tokenizer(self, train_docs):
        from ..tokenizer import ByteTokenizer, load_tokenizer, train_bpe
        kind = self.cfg.tokenizer
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            t0 = time.perf_counter()
            tok = train_bpe(corpus_texts(train_docs, self.cfg.bpe_train_bytes), vocab_size=self.cfg.bpe_vocab_size)
            self.log(f"trained byte-level BPE: vocab {tok.vocab_size} in {time.perf_counter() - t0:.1f}s")
            return tok
        return load_tokenizer(kind)

    def setup(self) -> None:
        c = self.cfg
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        np.random.seed(c.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        state = None
        if c.resume:
            state = ckpt.load_trainer_state(self.out)
            saved = state["train_config"]
            for k in ("arch", "data", "seq_len", "batch_size", "val_fraction", "tokenizer", "preset", "model_config"):
                if saved.get(k) != getattr(c, k):
                    raise ValueError(f"--resume: {k} differs from the checkpoint's ({getattr(c, k)!r} vs "
                                     f"{saved.get(k)!r}); resume with the same settings")
        docs = load_corpus(c.data)
        self.train_docs, self.val_docs = split_corpus(docs, c.val_fraction)
        if state is not None:
            from ..tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(ckpt.resolve_checkpoint(self.out))
        else:
            self.tokenizer = self.build_tokenizer(self.train_docs)
        enc = self._encoder()
        tok = self.tokenizer
        self.loader = PackedLoader(self.train_docs, enc, c.seq_len, c.batch_size, tok.bos_id, tok.eos_id,
                                   self.rank, self.world_size, documents=c.pack_documents)
        val_loader = PackedLoader(self.val_docs, enc, c.seq_len, c.batch_size, tok.bos_id, tok.eos_id,
                                  self.rank, self.world_size, documents=c.pack_documents)
        self.val_batches = [val_loader.next_batch() for _ in range(c.eval_batches)]

        self.dev = self.device()
        if state is not None:      # the checkpoint's own config and weights
            model = ckpt.load_model(self.out)[0].train()
        else:
            model = build_model(c.arch, self.model_config(tok.vocab_size))
        model.to(self.dev)
        if self.parallelize is not None:
            model = self.parallelize(model)
        self.raw_model = model
        if c.compile:
            # per block (as the distributed trainer does): both loss paths, the full forward and the chunked
            # `hidden_states` one past `loss_chunk_tokens`, run compiled blocks; a whole-model compile would
            # cover the forward only
            from tnllm.compile import compile_model
            compile_model(model, mode=c.compile_mode)
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr, betas=tuple(c.betas),
                                           fused=self.dev.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(c, s) / c.lr)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["data"])
            self.step = int(state["step"])
            _set_rng_state(state["rng"])
            src = ckpt.resolve_checkpoint(self.out) / ckpt.METRICS
            if self.is_main:          # the log continues from the checkpoint, dropping rows after it
                self.metrics_file.write_text(src.read_text() if src.exists() else "")
            self.history = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
            self.log(f"resumed from {ckpt.resolve_checkpoint(self.out)} at step {self.step}")
            if self.step >= c.steps:
                self.log(f"--resume: the checkpoint is at step {self.step} and --steps is {c.steps}: no steps left "
                         f"to train (raise --steps to continue); evaluating the checkpoint only")
        elif self.is_main:
            self.metrics_file.write_text("")
        self.num_params = sum(p.numel() for p in model.parameters())

    def _encoder(self):
        tok = self.tokenizer
        if hasattr(tok, "encode_bytes"):
            return tok.encode_bytes
        return lambda data: np.asarray(tok.encode(data.decode("utf-8")), dtype=np.int64)

    # -- steps ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _graph_step_begin(self) -> None:
        """With CUDA-graph compile modes: tell the graph trees a new iteration starts, so the blocks' graphs
        replay over the previous step's (now dead) outputs instead of re-recording."""
        if self.cfg.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def train_step(self, batch: torch.Tensor) -> float:
        self.model.train()
        self._graph_step_begin()
        with self._autocast():
            loss = lm_loss(self.model, batch.to(self.dev, non_blocking=True), self.cfg.loss_chunk_tokens,
                           self.cfg.fused_loss)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean validation loss over the fixed validation batches, and its perplexity."""
        self.model.eval()
        losses = []
        for b in self.val_batches:
            self._graph_step_begin()
            with self._autocast():
                losses.append(float(lm_loss(self.model, b.to(self.dev), self.cfg.loss_chunk_tokens,
                                           self.cfg.fused_loss)))
        loss = self.reduce_mean(sum(losses) / len(losses))
        return loss, math.exp(min(loss, 50.0))

    def trainer_state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "data": self.loader.state_dict(),
                "train_config": self.cfg.to_dict()}

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        return ckpt.save_checkpoint(self.out, self.step, self.raw_model, self.tokenizer, self.trainer_state(),
                                    self.metrics_file, keep=self.cfg.keep_checkpoints)

    def measure_step_time(self, warmup: int = 3, timed: int = 5) -> float:
        """Seconds per training step: ``warmup`` steps (compilation happens there) then the mean of ``timed``
        steps. The model, optimizer, scheduler, data position and RNG are put back as they were, so a ``fit()``
        afterwards trains exactly as without the measurement. Call after ``setup()`` on a fresh run."""
        if not hasattr(self, "model"):
            self.setup()
        if self.step != 0:
            raise ValueError("measure_step_time runs on a fresh run (step 0), not on a resumed or trained one")
        c = self.cfg
        weights = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        rng, lanes = _rng_state(), self.loader.state_dict()
        for _ in range(warmup):
            self.train_step(self.loader.next_batch())
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t0 = time.perf_counter()
        for _ in range(timed):
            self.train_step(self.loader.next_batch())      # float(loss) synchronises each step
        dt = (time.perf_counter() - t0) / max(1, timed)
        with torch.no_grad():
            self.raw_model.load_state_dict(weights)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, c.weight_decay), lr=c.lr, betas=tuple(c.betas),
                                           fused=self.dev.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(self.cfg, s) / self.cfg.lr)
        self.loader.load_state_dict(lanes)
        _set_rng_state(rng)
        return dt

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``cfg.steps``; returns a summary (final val loss/ppl, tokens/s, time, checkpoint)."""
        from tqdm import tqdm
        c = self.cfg
        if not hasattr(self, "model"):
            self.setup()
        tokens_per_step = c.batch_size * c.seq_len
        self.log(f"{c.arch}: {self.num_params / 1e6:.2f}M params, vocab {self.tokenizer.vocab_size}, "
                 f"{len(self.train_docs)} train / {len(self.val_docs)} val documents, "
                 f"{c.steps} steps x {tokens_per_step} tokens, device {self.dev}")
        bar = tqdm(total=c.steps, initial=self.step, disable=not (self.is_main and c.progress), unit="step",
                   dynamic_ncols=True, leave=True)
        t_start, tok_s, val = time.perf_counter(), 0.0, None
        start_step, last_path = self.step, None
        while self.step < c.steps:
            t0 = time.perf_counter()
            batch = self.loader.next_batch()
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.reduce_mean(self.train_step(batch))
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.step}; lower --lr")
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * tokens_per_step / dt
            self.step += 1
            self.record({"step": self.step, "loss": round(loss, 6), "lr": lr, "tok_s": round(tok_s, 1)})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            end = self.step == c.steps
            if end or (c.eval_every and self.step % c.eval_every == 0):
                vl, ppl = self.evaluate()
                val = (vl, ppl)
                self.record({"step": self.step, "val_loss": round(vl, 6), "val_ppl": round(ppl, 4)})
                self.log(f"step {self.step}: val loss {vl:.4f}, perplexity {ppl:.2f}")
            if c.checkpoint and (end or (c.save_every and self.step % c.save_every == 0)):
                last_path = self.save()
        bar.close()
        elapsed = time.perf_counter() - t_start
        if val is None:                # resumed at the end already
            val = self.evaluate()
        steps_run = self.step - start_step
        summary = {"arch": c.arch, "params": self.num_params, "steps": self.step, "val_loss": val[0],
                   "val_ppl": val[1], "train_time_s": elapsed,
                   "tokens_per_s": steps_run * tokens_per_step / elapsed if steps_run else 0.0,
                   "checkpoint": str(last_path) if last_path else None}
        if self.is_main and c.plot:
            summary["plot"] = str(plot_metrics(self.history, self.out / "loss.png", title=f"{c.arch}"))
        return summary


def plot_metrics(history: list[dict], path, title: str = "") -> Path:
    """PNG of train loss (and its moving average) and val loss against step."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        s, l = zip(*tr)
        ax.plot(s, l, lw=0.6, alpha=0.4, label="train loss")
        w = max(1, len(l) // 50)
        if w > 1:
            sm = np.convolve(l, np.ones(w) / w, mode="valid")
            ax.plot(s[w - 1:], sm, lw=1.5, label=f"train loss ({w}-step mean)")
    if va:
        s, l = zip(*va)
        ax.plot(s, l, "o-", lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def compare(cfg: TrainConfig, archs=ARCHS, log: Callable[[str], None] | None = None) -> list[dict]:
    """Train each arch with the same data, tokenizer, seed, steps and batch (so the same tokens) into
    ``out_dir/<arch>``; returns their summaries."""
    results = []
    for arch in archs:
        c = dataclasses.replace(cfg, arch=arch, out_dir=str(Path(cfg.out_dir) / arch), resume=False)
        results.append(Trainer(c, log=log).fit())
    return results
