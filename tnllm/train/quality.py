"""Model-quality experiments: TNL against the parameter-matched Transformer over seeds and a learning-rate
sweep (``tnllm compare``), and the paper's ablations of TNL's parts (``tnllm ablate``).

Every run of one experiment reads the same tokens: the same corpus, split, tokenizer, sequence length, batch
size and step count; the data order does not depend on the seed, so a seed changes only the initialisation.
Results are means and sample standard deviations (ddof 1) over the seeds of the final validation loss
(nats/token, on the held-out split's fixed batches) and of the perplexity exp(loss).

``compare_grid``: for each architecture, every learning rate of the sweep trains with the first seed; the
rate with the lowest final validation loss is that architecture's, and the other seeds train with it.
With ``time_budget`` (seconds of training per run) both models' step times are measured first (after
warm-up, so compilation is excluded) and the step count becomes ``time_budget / slower step time``: both
models then see the same tokens and the slower one trains for about ``time_budget`` seconds.

``ablate``: variants of the TNL config (each one field changed from the released model), the same learning
rate and seeds for all; the table holds each variant's mean +- std and its difference to the released model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import TransNormerConfig
from .loop import ARCHS, TrainConfig, Trainer


def parse_seeds(spec: str, base: int = 0) -> list[int]:
    """``"3"`` -> [base, base + 1, base + 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    s = str(spec).strip()
    try:
        if "," in s:
            seeds = [int(x) for x in s.split(",") if x.strip()]
        else:
            n = int(s)
            if n < 1:
                raise ValueError
            seeds = list(range(base, base + n))
    except ValueError:
        raise ValueError(f"--seeds must be a count >= 1 or a comma list of seeds >= 0, got {spec!r}") from None
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be a count >= 1 or a comma list of distinct seeds >= 0, got {spec!r}")
    return seeds


def parse_lrs(spec: str) -> list[float]:
    """``"1e-3,3e-3"`` -> [0.001, 0.003] (each > 0, distinct)."""
    try:
        lrs = [float(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lr-sweep must be a comma list of learning rates > 0, got {spec!r}") from None
    if not lrs or any(not (x > 0 and math.isfinite(x)) for x in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"--lr-sweep must be a comma list of distinct learning rates > 0, got {spec!r}")
    return lrs


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _run_dir(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / name / f"lr{lr:g}-seed{seed}"


def _run_config(base: TrainConfig, out: Path, arch: str, name: str, lr: float, seed: int, steps: int,
                overrides: dict | None = None) -> TrainConfig:
    # min_lr keeps its ratio to lr, so every rate of a sweep has the same schedule shape
    ratio = base.min_lr / base.lr
    return dataclasses.replace(base, arch=arch, out_dir=str(_run_dir(out, name, lr, seed)), lr=lr, min_lr=lr * ratio,
                               seed=seed, steps=steps, resume=False, plot=False,
                               overrides=dict(base.overrides, **(overrides or {})))


def _curves(history: list[dict]) -> dict:
    return {"step": [r["step"] for r in history if "loss" in r],
            "loss": [r["loss"] for r in history if "loss" in r],
            "val_step": [r["step"] for r in history if "val_loss" in r],
            "val_loss": [r["val_loss"] for r in history if "val_loss" in r]}


def _fit(trainer: Trainer, name: str, log: Callable[[str], None]) -> dict:
    c = trainer.cfg
    s = trainer.fit()
    row = {"name": name, "arch": c.arch, "lr": c.lr, "seed": c.seed, "params": s["params"], "steps": s["steps"],
           "val_loss": s["val_loss"], "val_ppl": s["val_ppl"], "tokens_per_s": s["tokens_per_s"],
           "train_time_s": s["train_time_s"], "run_dir": c.out_dir, "curves": _curves(trainer.history)}
    log(f"[{name}] lr {c.lr:g} seed {c.seed}: val loss {s['val_loss']:.4f}, ppl {s['val_ppl']:.3f} "
        f"({s['train_time_s']:.1f}s, {s['tokens_per_s']:,.0f} tok/s)")
    return row


def _summary(rows: list[dict]) -> dict:
    loss_m, loss_s = mean_std([r["val_loss"] for r in rows])
    ppl_m, ppl_s = mean_std([r["val_ppl"] for r in rows])
    return {"n_seeds": len(rows), "seeds": [r["seed"] for r in rows], "val_loss": [r["val_loss"] for r in rows],
            "val_loss_mean": loss_m, "val_loss_std": loss_s, "val_ppl_mean": ppl_m, "val_ppl_std": ppl_s,
            "val_loss_min": min(r["val_loss"] for r in rows), "val_loss_max": max(r["val_loss"] for r in rows),
            "tokens_per_s_mean": mean_std([r["tokens_per_s"] for r in rows])[0],
            "train_time_s_mean": mean_std([r["train_time_s"] for r in rows])[0]}


def _calibrated_steps(trainers: dict[str, Trainer], time_budget: float, log) -> tuple[int, dict]:
    times = {}
    for arch, t in trainers.items():
        times[arch] = t.measure_step_time()
        log(f"[{arch}] {times[arch] * 1e3:.1f} ms per step (after warm-up)")
    slow = max(times.values())
    steps = int(time_budget // slow)
    if steps < 1:
        raise ValueError(f"--time-budget {time_budget:g}s is shorter than one training step ({slow:.2f}s)")
    for t in trainers.values():
        t.cfg.steps = steps        # the schedule reads cfg.steps when it runs
    log(f"time budget {time_budget:g}s / {slow * 1e3:.1f} ms per step (the slower model) = {steps} steps each")
    return steps, times


def _write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _plot_result(result: dict, path: Path, log) -> str | None:
    """The result's plot; a missing matplotlib is reported, not fatal (``replot`` draws it later)."""
    key = "archs" if result["kind"] == "compare" else "variants"
    groups = {g: [r for r in result["runs"] if r["name"] == g and
                  (result["kind"] != "compare" or r["lr"] == result["best_lr"][g])] for g in result[key]}
    try:
        return str(plot_runs(groups, path, title=_title(result)))
    except ImportError as e:
        log(f"no plot ({e}); draw it later with --replot {path.with_suffix('.json')}")
        return None


def replot(json_path, log: Callable[[str], None] = print) -> str:
    """Draw the PNG of a ``compare.json`` / ``ablate.json`` written earlier (e.g. on a machine without
    matplotlib) next to it; returns its path."""
    p = Path(json_path)
    if not p.is_file():
        raise FileNotFoundError(f"--replot {str(p)!r} does not exist (a compare.json or ablate.json)")
    result = json.loads(p.read_text())
    if result.get("kind") not in ("compare", "ablate") or "runs" not in result:
        raise ValueError(f"{p} is not a compare.json or ablate.json written by tnllm compare / ablate")
    out = _plot_result(result, p.with_suffix(".png"), log)
    if out is None:
        raise ValueError("matplotlib is needed to draw the plot")
    return out


def compare_grid(base: TrainConfig, seeds: Sequence[int], lrs: Sequence[float] | None = None,
                 time_budget: float | None = None, archs: Sequence[str] = ARCHS,
                 log: Callable[[str], None] = print) -> dict:
    """TNL and the parameter-matched Transformer on the same tokens: an lr sweep on the first seed per arch,
    the other seeds at each arch's best rate. Writes ``compare.json`` (after every run, ``"complete": false``
    until the end) and ``compare.png`` under ``base.out_dir`` and returns the dict (see the module docstring).
    ``archs`` may name one architecture, e.g. to run the two in separate processes with the same ``steps``."""
    base.validate()
    seeds, lrs = list(seeds), list(lrs) if lrs else [base.lr]
    if not seeds:
        raise ValueError("compare needs at least one seed")
    archs = list(archs)
    if not archs or len(set(archs)) != len(archs) or any(a not in ARCHS for a in archs):
        raise ValueError(f"archs must be distinct names from {ARCHS}, got {archs}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"--time-budget must be > 0 seconds, got {time_budget}")
    out = Path(base.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    steps, step_times = base.steps, None
    first = {a: Trainer(_run_config(base, out, a, a, lrs[0], seeds[0], steps)) for a in archs}
    for t in first.values():
        t.setup()
    if time_budget is not None:
        steps, step_times = _calibrated_steps(first, time_budget, log)
    params = {a: t.num_params for a, t in first.items()}
    head = {"kind": "compare", "archs": archs, "seeds": seeds, "lr_sweep": lrs, "steps": steps,
            "batch_size": base.batch_size, "seq_len": base.seq_len,
            "tokens_per_run": steps * base.batch_size * base.seq_len, "time_budget_s": time_budget,
            "step_time_s": step_times, "params": params,
            "data": base.data or "embedded (Python standard library)", "tokenizer": base.tokenizer,
            "preset": base.preset, "model_config": base.model_config, "device": base.device, "compile": base.compile,
            "compile_mode": base.compile_mode}
    if len(archs) == 2:
        ratio = params[archs[1]] / params[archs[0]]
        log(f"parameters: " + ", ".join(f"{a} {p:,}" for a, p in params.items()) + f" (ratio {ratio:.4f})")
        if abs(ratio - 1) > 0.01:
            raise ValueError(f"the models' parameter counts differ by {abs(ratio - 1):.2%} (> 1%): {params}")
    rows, sweep, best = [], {}, {}
    for a in archs:
        sweep[a] = []
        for i, lr in enumerate(lrs):
            t = first.pop(a) if i == 0 else Trainer(_run_config(base, out, a, a, lr, seeds[0], steps))
            r = _fit(t, a, log)
            rows.append(r)
            sweep[a].append({"lr": lr, "seed": seeds[0], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]})
            _write_json(out / "compare.json", dict(head, complete=False, sweep=sweep, runs=rows))
        best[a] = min(sweep[a], key=lambda x: x["val_loss"])["lr"]
        if len(lrs) > 1:
            log(f"[{a}] best lr {best[a]:g} of {', '.join(f'{x:g}' for x in lrs)}")
        for s in seeds[1:]:
            rows.append(_fit(Trainer(_run_config(base, out, a, a, best[a], s, steps)), a, log))
            _write_json(out / "compare.json", dict(head, complete=False, sweep=sweep, runs=rows))
    summary = {}
    for a in archs:
        sel = [r for r in rows if r["arch"] == a and r["lr"] == best[a]]
        summary[a] = dict(_summary(sel), lr=best[a], params=params[a])
    result = dict(head, complete=True, best_lr=best, summary=summary, sweep=sweep,
                  total_time_s=time.perf_counter() - t_start, runs=rows)
    _write_json(out / "compare.json", result)
    result["plot"] = _plot_result(result, out / "compare.png", log) if base.plot else None
    _write_json(out / "compare.json", result)
    return result


# -- ablations ------------------------------------------------------------------------------------------
ABLATIONS: dict[str, str] = {
    "released": "the released model: LRPE on layer 0, the layer decay schedule, SRMSNorm, SGLU",
    "no_lrpe": "no LRPE on any layer",
    "no_decay": "no decay (lambda = 1 on every layer)",
    "uniform_decay": "decay on every layer with the same per-head rate (ALiBi slope) in all layers",
    "rmsnorm": "RMSNorm with a learned weight instead of SRMSNorm",
    "swiglu": "SwiGLU (SiLU on the gate branch) instead of SGLU",
}


def ablation_overrides(name: str, mcfg: TransNormerConfig) -> dict:
    """The config fields ablation ``name`` changes from ``mcfg`` (the released-model config)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose from {list(ABLATIONS)}")
    return {"released": {}, "no_lrpe": {"linear_use_lrpe_list": [0] * mcfg.decoder_layers},
            "no_decay": {"decay_type": "none"}, "uniform_decay": {"decay_type": "uniform"},
            "rmsnorm": {"norm_type": "rmsnorm"}, "swiglu": {"glu_act": "silu"}}[name]


def _base_model_config(base: TrainConfig) -> TransNormerConfig:
    if base.model_config is not None:
        return TransNormerConfig.from_json(base.model_config)
    return TransNormerConfig.from_preset(base.preset, **base.overrides)


def ablate(base: TrainConfig, seeds: Sequence[int], variants: Sequence[str] | None = None,
           log: Callable[[str], None] = print) -> dict:
    """Train each TNL variant over ``seeds`` at ``base.lr``; writes ``ablate.json``, ``ablate.md`` (the table)
    and ``ablate.png`` under ``base.out_dir`` and returns the dict."""
    base.validate()
    if base.arch != "transnormer":
        raise ValueError("ablations change TNL's parts: --arch must be transnormer")
    variants = list(variants) if variants else list(ABLATIONS)
    for v in variants:
        if v not in ABLATIONS:
            raise ValueError(f"unknown ablation {v!r}; choose from {list(ABLATIONS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"ablation variants repeat: {variants}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("ablate needs at least one seed")
    mcfg = _base_model_config(base)
    out = Path(base.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows = []
    for v in variants:
        ov = ablation_overrides(v, mcfg)
        for s in seeds:
            rows.append(dict(_fit(Trainer(_run_config(base, out, "transnormer", v, base.lr, s, base.steps, ov)), v,
                                  log), overrides=ov))
            _write_json(out / "ablate.json", {"kind": "ablate", "complete": False, "variants": variants,
                                              "seeds": seeds, "runs": rows})
    summary = {v: dict(_summary([r for r in rows if r["name"] == v]), params=rows[[r["name"] for r in rows].index(v)]
                       ["params"], what=ABLATIONS[v]) for v in variants}
    ref = summary.get("released")
    for v, s in summary.items():
        s["delta_val_loss"] = s["val_loss_mean"] - ref["val_loss_mean"] if ref else None
    result = {"kind": "ablate", "complete": True, "variants": variants, "seeds": seeds, "lr": base.lr, "steps": base.steps,
              "batch_size": base.batch_size, "seq_len": base.seq_len,
              "tokens_per_run": base.steps * base.batch_size * base.seq_len,
              "data": base.data or "embedded (Python standard library)", "tokenizer": base.tokenizer,
              "preset": base.preset, "model_config": base.model_config, "summary": summary,
              "total_time_s": time.perf_counter() - t_start, "runs": rows}
    result["table"] = ablation_table(result)
    (out / "ablate.md").write_text(result["table"] + "\n")
    _write_json(out / "ablate.json", result)
    result["plot"] = _plot_result(result, out / "ablate.png", log) if base.plot else None
    _write_json(out / "ablate.json", result)
    return result


def ablation_table(result: dict) -> str:
    """Markdown table: variant, params, val loss mean +- std, delta to the released model, ppl mean +- std."""
    n = len(result["seeds"])
    lines = [f"| variant | params | val loss (mean ± std, {n} seeds) | Δ vs released | val ppl (mean ± std) |",
             "|---|---|---|---|---|"]
    for v, s in result["summary"].items():
        d = s.get("delta_val_loss")
        lines.append(f"| {v} | {s['params'] / 1e6:.3f}M | {s['val_loss_mean']:.4f} ± {s['val_loss_std']:.4f} | "
                     f"{'–' if d is None or v == 'released' else f'{d:+.4f}'} | "
                     f"{s['val_ppl_mean']:.3f} ± {s['val_ppl_std']:.3f} |")
    return "\n".join(lines)


def compare_table(result: dict) -> str:
    """Markdown table of a compare result: arch, params, lr, val loss and ppl (mean +- std), speed."""
    n = len(result["seeds"])
    lines = [f"| model | params | lr | val loss (mean ± std, {n} seeds) | val ppl (mean ± std) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for a, s in result["summary"].items():
        lines.append(f"| {a} | {s['params'] / 1e6:.3f}M | {s['lr']:g} | {s['val_loss_mean']:.4f} ± "
                     f"{s['val_loss_std']:.4f} | {s['val_ppl_mean']:.3f} ± {s['val_ppl_std']:.3f} | "
                     f"{s['tokens_per_s_mean']:,.0f} |")
    return "\n".join(lines)


def _title(result: dict) -> str:
    model = result.get("model_config") or result.get("preset")
    return (f"{model}, {result['steps']} steps x {result['batch_size']} x {result['seq_len']} tokens, "
            f"{len(result['seeds'])} seed(s)")


def plot_runs(groups: dict[str, list[dict]], path, title: str = "") -> Path:
    """PNG: per group, the mean over its runs (seeds) of the train loss (moving mean) and of the val loss, each
    with a band of +- one sample standard deviation over the runs (no band for a single run)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for i, (name, runs) in enumerate(groups.items()):
        if not runs:
            continue
        color = f"C{i}"
        n = min(len(r["curves"]["loss"]) for r in runs)
        if n:
            w = max(1, n // 40)
            tr = np.array([np.convolve(r["curves"]["loss"][:n], np.ones(w) / w, mode="valid") for r in runs])
            st = np.asarray(runs[0]["curves"]["step"][w - 1:n])
            m, s = tr.mean(0), (tr.std(0, ddof=1) if len(runs) > 1 else np.zeros(tr.shape[1]))
            ax_t.plot(st, m, color=color, lw=1.5, label=f"{name} (n={len(runs)})")
            ax_t.fill_between(st, m - s, m + s, color=color, alpha=0.2, lw=0)
        k = min(len(r["curves"]["val_loss"]) for r in runs)
        if k:
            va = np.array([r["curves"]["val_loss"][:k] for r in runs])
            sv = np.asarray(runs[0]["curves"]["val_step"][:k])
            m, s = va.mean(0), (va.std(0, ddof=1) if len(runs) > 1 else np.zeros(k))
            ax_v.plot(sv, m, "o-", color=color, lw=1.5, ms=3, label=f"{name}: {m[-1]:.4f} ± {s[-1]:.4f}")
            ax_v.fill_between(sv, m - s, m + s, color=color, alpha=0.2, lw=0)
    ax_t.set_title("train loss (moving mean; band: ± 1 std over seeds)")
    ax_v.set_title("validation loss (held-out split; band: ± 1 std)")
    for ax in (ax_t, ax_v):
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
