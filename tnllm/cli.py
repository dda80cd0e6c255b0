"""The ``tnllm`` command (also ``python -m tnllm``): demo, train, generate, compare, ablate, convert, export,
serve, check.

The only module that reads argv. Run ``tnllm <command> --help`` for the options; docs/cli.md has examples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_PROMPT = "def fibonacci(n):\n"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (required options and flags have none to show)."""

    def _get_help_string(self, action):
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


# -- argument groups ------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {s}")
    return v


def _add_train_args(p: argparse.ArgumentParser, out_default: str, steps_default: int) -> None:
    from .train.loop import ARCHS, TrainConfig
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=d.arch,
                   help="transnormer or the parameter-matched Llama-style transformer baseline")
    g.add_argument("--preset", default=d.preset, help="model preset; see `tnllm train --list-presets`")
    g.add_argument("--config", dest="model_config", default=None, help="a model config.json (overrides --preset)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="text file, folder of text files, or .jsonl with a 'text' field (default: the Python "
                        "standard library's .py sources, embedded in every Python install)")
    g.add_argument("--tokenizer", default=d.tokenizer,
                   help="byte (default, 259 ids), bpe (train a byte-level BPE on the train split), or a saved "
                        "tokenizer path (folder, tokenizer.json or tokenizer.model)")
    g.add_argument("--bpe-vocab-size", type=_positive_int, default=d.bpe_vocab_size,
                   help="vocabulary size of the BPE trained with --tokenizer bpe")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of the documents held out for validation")
    g.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help="tokens per training sequence")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="sequences per step")
    g.add_argument("--pack-documents", action="store_true",
                   help="no attention across documents inside a row: each document (or the piece of it in a row) "
                        "starts from the zero state at position 0, and the target that starts the next document "
                        "is not trained on")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive_int, default=steps_default, help="optimizer steps in all")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=_nonneg_int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (Linear and Embedding weights only)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (0: off)")
    g.add_argument("--seed", type=_nonneg_int, default=d.seed, help="seed of init, data order and sampling")
    g.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--compile", action="store_true", help="torch.compile every decoder block (fullgraph; the head and the loss stay eager)")
    from tnllm.compile.policy import MODES     # the training loop checks its compile_mode against the same tuple
    g.add_argument("--compile-mode", default=None, choices=MODES,
                   help="the blocks' torch.compile mode (implies --compile); reduce-overhead replays each block as "
                        "a CUDA graph (one-process training only)")
    g.add_argument("--no-fused-loss", action="store_true",
                   help="the head + cross entropy on logits (checkpointed chunks of loss_chunk_tokens rows) instead "
                        "of tnllm.ops.fused_linear_cross_entropy, which never materialises [B, T, V] logits")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out_default, help="run directory")
    g.add_argument("--eval-every", type=_nonneg_int, default=d.eval_every,
                   help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=_positive_int, default=d.eval_batches, help="validation batches")
    g.add_argument("--save-every", type=_nonneg_int, default=d.save_every,
                   help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=d.keep_checkpoints,
                   help="newest step-* folders kept in the run directory")
    g.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no loss.png at the end")


def _train_config(a: argparse.Namespace):
    from .train.loop import TrainConfig
    return TrainConfig(out_dir=a.out, arch=a.arch, preset=a.preset, model_config=a.model_config, data=a.data,
                       tokenizer=a.tokenizer, bpe_vocab_size=a.bpe_vocab_size, val_fraction=a.val_fraction,
                       seq_len=a.seq_len, batch_size=a.batch_size, steps=a.steps, lr=a.lr, min_lr=a.min_lr,
                       warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                       eval_every=a.eval_every, eval_batches=a.eval_batches, save_every=a.save_every,
                       keep_checkpoints=a.keep_checkpoints, seed=a.seed, device=a.device,
                       compile=a.compile or a.compile_mode is not None, compile_mode=a.compile_mode or "default",
                       resume=a.resume, progress=not a.no_progress, plot=not a.no_plot,
                       pack_documents=a.pack_documents, fused_loss=not a.no_fused_loss)


def _add_sampling_args(p: argparse.ArgumentParser, max_new_default: int = 200, seed: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=max_new_default,
                   help="tokens to generate per prompt (fewer when it stops at end-of-text)")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (None: all)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set of mass p")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the row (1: off)")
    if seed:     # `demo` samples with its training --seed
        g.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible output)")
    g.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")


def _print_summary(s: dict) -> None:
    print(f"[{s['arch']}] {s['params'] / 1e6:.2f}M params, {s['steps']} steps: "
          f"val loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}, "
          f"{s['tokens_per_s']:,.0f} tok/s, {s['train_time_s']:.1f}s"
          + (f"; checkpoint {s['checkpoint']}" if s.get("checkpoint") else "")
          + (f"; plot {s['plot']}" if s.get("plot") else ""), flush=True)


# -- commands -------------------------------------------------------------------------------------
def cmd_train(a) -> int:
    if a.list_presets:
        from .config import PRESETS, TransNormerConfig
        for name in PRESETS:
            c = TransNormerConfig.from_preset(name)
            print(f"{name:>6}: d={c.decoder_embed_dim} L={c.decoder_layers} H={c.decoder_attention_heads} "
                  f"g={c.glu_dim} V={c.vocab_size} ({c.num_params() / 1e6:.1f}M params)")
        return 0
    import os
    if a.fsdp is not None or a.tp is not None or "WORLD_SIZE" in os.environ:     # torchrun (docs/distributed.md)
        from .train.dist import DistributedTrainer, destroy, is_main
        ok = False
        try:
            summary = DistributedTrainer(_train_config(a), fsdp=a.fsdp, tp=a.tp, ac=a.ac, mp=a.mp).fit()
            if is_main():
                _print_summary(summary)
            ok = True
        finally:
            destroy(barrier=ok)
        return 0
    from .train.loop import Trainer
    parallelize = None
    if a.ac != "none":
        import functools
        from .train.parallelize import apply_ac
        parallelize = functools.partial(apply_ac, mode=a.ac)
    if a.mp != "fp32":
        raise ValueError("--mp bf16 is FSDP's mixed precision: run under torchrun (one process: --device cuda "
                         "trains in bf16 autocast already)")
    summary = Trainer(_train_config(a), parallelize=parallelize).fit()
    _print_summary(summary)
    return 0


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel (under torchrun; docs/distributed.md)")
    g.add_argument("--fsdp", type=int, default=None, help="FSDP2 (data parallel) degree; -1 or unset: world / tp")
    g.add_argument("--tp", type=int, default=None, help="tensor parallel degree (divides the heads); unset: 1")
    g.add_argument("--ac", choices=("none", "full", "selective"), default="none",
                   help="activation checkpointing per block (selective keeps the attention op's outputs)")
    g.add_argument("--mp", choices=("fp32", "bf16"), default="fp32",
                   help="FSDP mixed precision: bf16 params/compute, fp32 gradient reduction")


def _prompts(a) -> list[str]:
    prompts = list(a.prompt or [])
    if a.prompt_file:
        p = Path(a.prompt_file)
        if not p.is_file():
            raise FileNotFoundError(f"--prompt-file {str(p)!r} does not exist")
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (or --prompt-file)")
    return [s.replace("\\n", "\n") for s in prompts]


def run_generation(model, tokenizer, prompts: list[str], a, stream=True, out=None) -> list[str]:
    """Encode (bos + prompt), generate (several prompts: packed without padding where the model can, else
    left-padded), print to ``out`` (stdout); returns the completions."""
    out = sys.stdout if out is None else out
    import torch
    from .generate import TextStreamer, check_sampling, generate
    check_sampling(a.temperature, a.top_k, a.top_p, a.repetition_penalty)
    rows = []
    for p in prompts:
        ids = tokenizer.encode(p)
        rows.append(([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids)
    if any(len(r) == 0 for r in rows):
        raise ValueError("an empty prompt encodes to no tokens and the tokenizer has no bos token")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for p, r in zip(prompts, rows):
        if limit is not None and len(r) + a.max_new_tokens > limit:
            raise ValueError(f"prompt {p[:40]!r}... is {len(r)} tokens; with --max-new-tokens {a.max_new_tokens} "
                             f"it exceeds the model's max_position_embeddings ({limit})")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.tensor(rows, dtype=torch.long) if len(rows) == 1 else [torch.tensor(r, dtype=torch.long) for r in rows]
    eos = None if a.no_stop else tokenizer.eos_id
    streamer = None
    if stream and len(prompts) == 1:
        out.write(prompts[0])
        out.flush()
        streamer = TextStreamer(tokenizer, lambda s: (out.write(s), out.flush()),
                                stop_ids=[eos] if eos is not None else [])
    t0 = time.perf_counter()
    res = generate(model, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                   top_p=a.top_p, repetition_penalty=a.repetition_penalty, eos_token_id=eos, seed=a.seed,
                   streamer=streamer, pad_token_id=pad)
    dt = time.perf_counter() - t0
    completions = []
    for i in range(len(prompts)):
        new = res[i][len(rows[i]):].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        completions.append(tokenizer.decode(new))
    if streamer is not None:
        streamer.flush()
        out.write("\n")
    else:
        for p, c in zip(prompts, completions):
            out.write(f"--- prompt: {p!r}\n{p}{c}\n")
    n_new = len(res[0]) - len(rows[0])
    print(f"[generated {n_new} tokens x {len(prompts)} prompt(s) in {dt:.2f}s, "
          f"{n_new * len(prompts) / max(dt, 1e-9):,.0f} tok/s]", file=sys.stderr, flush=True)
    return completions


def cmd_generate(a) -> int:
    from .checkpoints import load_model
    from .tokenizer import load_tokenizer
    prompts = _prompts(a)
    if a.onnx and a.backend != "onnxruntime":
        raise ValueError("--onnx runs the graph in onnxruntime: add --backend onnxruntime")
    if a.backend == "onnxruntime":
        if not a.onnx:
            raise ValueError("--backend onnxruntime needs --onnx FILE (from `tnllm export onnx`)")
        from .export import OnnxRecurrentDecoder
        dec = OnnxRecurrentDecoder(a.onnx)
        src = a.tokenizer or a.ckpt
        if src is None:
            raise ValueError("--backend onnxruntime needs --tokenizer PATH or --ckpt DIR for the tokenizer")
        if a.ckpt:
            from .checkpoints import read_model_config, resolve_checkpoint
            folder = resolve_checkpoint(a.ckpt)
            dec.check_config(read_model_config(folder), where=f"--ckpt {folder}")
        tokenizer = load_tokenizer(a.tokenizer if a.tokenizer else resolve_checkpoint(a.ckpt))
        run_generation(dec, tokenizer, prompts, a, stream=not a.no_stream)
        return 0
    if a.ckpt is None:
        raise ValueError("give --ckpt DIR (a run directory or checkpoint folder from `tnllm train`)")
    import torch
    from .train.loop import resolve_device
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    device = resolve_device(a.device)
    model, tokenizer = load_model(a.ckpt, device=device, dtype=dtype)
    if a.tokenizer:
        tokenizer = load_tokenizer(a.tokenizer)
    run_generation(model, tokenizer, prompts, a, stream=not a.no_stream)
    return 0


def _grid_config(a):
    import dataclasses
    if a.resume:
        raise ValueError(f"--resume is for `tnllm train`: every run of `tnllm {a.command}` starts fresh")
    return dataclasses.replace(_train_config(a), checkpoint=a.checkpoint)


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--seeds", default="1", help="a count N (seeds --seed .. --seed+N-1) or a comma list, e.g. 0,1,2 "
                                                "(default 1); results are mean +- std over them")
    g.add_argument("--checkpoint", action="store_true", help="also save each run's final checkpoint (default: "
                                                             "metrics only)")
    g.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of a compare.json / "
                                                                  "ablate.json written earlier, next to it")


def cmd_compare(a) -> int:
    from .train.loop import ARCHS
    from .train.quality import compare_grid, compare_table, parse_lrs, parse_seeds, replot
    if a.replot:
        print(replot(a.replot))
        return 0
    if a.time_budget is not None and not a.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {a.time_budget}")
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    if not archs or any(x not in ARCHS for x in archs) or len(set(archs)) != len(archs):
        raise ValueError(f"--archs must be a comma list of distinct names from {ARCHS}, got {a.archs!r}")
    cfg = _grid_config(a)
    lrs = parse_lrs(a.lr_sweep) if a.lr_sweep else None
    res = compare_grid(cfg, parse_seeds(a.seeds, a.seed), lrs, time_budget=a.time_budget, archs=archs)
    print(f"\nsame data, tokenizer, batches and steps for every run ({res['steps']} x {cfg.batch_size} x "
          f"{cfg.seq_len} = {res['tokens_per_run']:,} tokens); seeds {res['seeds']}"
          + (f"; lr sweep {', '.join(f'{x:g}' for x in res['lr_sweep'])} on seed {res['seeds'][0]}"
             if len(res["lr_sweep"]) > 1 else ""))
    print(compare_table(res))
    print(f"wrote {Path(cfg.out_dir) / 'compare.json'}" + (f" and {res['plot']}" if res["plot"] else "")
          + f" ({res['total_time_s']:.0f}s)")
    return 0


def cmd_ablate(a) -> int:
    from .train.quality import ABLATIONS, ablate, parse_seeds, replot
    if a.replot:
        print(replot(a.replot))
        return 0
    if a.list_variants:
        for k, v in ABLATIONS.items():
            print(f"{k:>14}: {v}")
        return 0
    cfg = _grid_config(a)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else None
    res = ablate(cfg, parse_seeds(a.seeds, a.seed), variants)
    print(f"\nsame data, tokenizer, batches, steps and lr {cfg.lr:g} for every run ({cfg.steps} x {cfg.batch_size} "
          f"x {cfg.seq_len} = {res['tokens_per_run']:,} tokens); seeds {res['seeds']}")
    print(res["table"])
    print(f"wrote {Path(cfg.out_dir) / 'ablate.json'}, ablate.md" + (f" and {res['plot']}" if res["plot"] else "")
          + f" ({res['total_time_s']:.0f}s)")
    return 0


def cmd_demo(a) -> int:
    """Train the demo model on the embedded corpus, then generate from a prompt."""
    from .checkpoints import load_model
    from .train.loop import Trainer
    t0 = time.perf_counter()
    summary = Trainer(_train_config(a)).fit()
    _print_summary(summary)
    model, tokenizer = load_model(a.out)
    print(f"\n--- sample (temperature {a.temperature}, top-p {a.top_p}, seed {a.seed}) ---", flush=True)
    run_generation(model, tokenizer, [a.prompt.replace("\\n", "\n")], a)
    print(f"--- demo done in {time.perf_counter() - t0:.0f}s; try: tnllm generate --ckpt {a.out} "
          f"--prompt 'import os\\n' ---")
    return 0


def cmd_convert(a) -> int:
    from .checkpoints import convert, resolve_checkpoint
    src = resolve_checkpoint(a.src)          # a run directory converts its latest checkpoint
    direction = convert(src, a.dst)
    print(f"converted {src} -> {a.dst} ({direction})")
    return 0


def cmd_export(a) -> int:
    from .export import export_checkpoint_onnx

    def progress(msg: str) -> None:
        print(f"[export] {msg}", file=sys.stderr, flush=True)

    r = export_checkpoint_onnx(a.ckpt, a.out, opset=a.opset, quantize=a.quantize, progress=progress)
    mb = 1 << 20
    print(f"wrote {r['path']} ({r['bytes'] / mb:.1f} MiB, {r['num_params'] / 1e6:.2f}M params, opset {r['opset']}, "
          f"checked against PyTorch in onnxruntime) in {r['export_seconds']:.1f}s")
    if "int8_path" in r:
        acc = r["int8_accuracy"]
        print(f"wrote {r['int8_path']} ({r['int8_bytes'] / mb:.1f} MiB int8): max |dlogit| "
              f"{acc['max_abs_logit_err']:.3g}, top-1 agreement {acc['top1_agreement']:.1%}, greedy tokens "
              f"identical {acc['greedy_tokens_identical']:.1%}")
    print(f"report: {Path(r['path']).with_suffix('.export.json')}; run it: tnllm generate --backend onnxruntime "
          f"--onnx {r['path']} --ckpt {a.ckpt} --prompt '...'")
    return 0


def cmd_bench_decode(a) -> int:
    from .bench_decode import run
    run(a)
    return 0


def cmd_serve(a) -> int:
    from .serve import serve
    return serve(a)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter      # every option's help ends with its default
    p = argparse.ArgumentParser(prog="tnllm", description="TransNormerLLM + Lightning Attention in pure PyTorch",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser
    sub.add_parser = lambda *args, **kw: _add_parser(*args, formatter_class=fmt, **kw)

    d = sub.add_parser("demo", help="train a small TNL on the embedded corpus (~2-3 min on 2 CPU cores), then sample")
    _add_train_args(d, out_default="runs/demo", steps_default=400)
    d.add_argument("--prompt", default=DEMO_PROMPT, help="prompt for the sample")
    _add_sampling_args(d, max_new_default=200, seed=False)
    d.set_defaults(fn=cmd_demo, no_stream=False)

    t = sub.add_parser("train", help="train TransNormerLLM (or the transformer baseline)")
    _add_train_args(t, out_default="runs/train", steps_default=400)
    t.add_argument("--list-presets", action="store_true", help="print the model presets and exit")
    _add_parallel_args(t)
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="sample from a checkpoint")
    g.add_argument("--ckpt", default=None, help="run directory (its latest checkpoint) or checkpoint folder")
    g.add_argument("--prompt", action="append", help="prompt text ('\\n' for newlines); repeat for a batch")
    g.add_argument("--prompt-file", default=None, help="one prompt per line")
    g.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="parameter dtype (auto: fp32, as loaded)")
    g.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="torch (the model) or onnxruntime (an exported step graph, with --onnx)")
    g.add_argument("--onnx", default=None, help="step.onnx from `tnllm export onnx` (with --backend onnxruntime)")
    g.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("compare", help="train TNL and the parameter-matched transformer on the same tokens over "
                                       "seeds (and an lr sweep); val loss mean +- std, plot")
    _add_train_args(c, out_default="runs/compare", steps_default=200)
    _add_grid_args(c)
    c.add_argument("--lr-sweep", default=None, help="comma list of peak learning rates tried on the first seed for "
                                                    "each model; each keeps its best for the other seeds "
                                                    "(default: --lr only)")
    c.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training per run: both models' step times are measured and --steps becomes "
                        "budget / the slower step time (same tokens for both)")
    c.add_argument("--archs", default="transnormer,transformer",
                   help="comma list of the models to train (default both); one of them, with a fixed --steps, "
                        "runs the two in separate processes on the same tokens")
    c.set_defaults(fn=cmd_compare)

    b = sub.add_parser("ablate", help="TNL ablations (no LRPE, no decay, uniform decay, RMSNorm, SwiGLU) over seeds")
    _add_train_args(b, out_default="runs/ablate", steps_default=200)
    _add_grid_args(b)
    b.add_argument("--variants", default=None, help="comma list of variants (default: all; see --list-variants)")
    b.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    b.set_defaults(fn=cmd_ablate)

    v = sub.add_parser("convert", help="convert between the released HF layout and a tnllm checkpoint folder")
    v.add_argument("src", help="a released folder, a tnllm checkpoint folder or a run directory (its latest)")
    v.add_argument("dst", help="the folder to write (must not exist or be empty)")
    v.set_defaults(fn=cmd_convert)

    e = sub.add_parser("export", help="export a checkpoint")
    esub = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    _add_esub = esub.add_parser
    esub.add_parser = lambda *args, **kw: _add_esub(*args, formatter_class=fmt, **kw)
    o = esub.add_parser("onnx", help="the recurrent step as ONNX (runs in onnxruntime)")
    o.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or released folder")
    o.add_argument("--out", required=True, help="the .onnx file to write")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset (18..23)")
    o.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write <out>.int8.onnx (int8 weights) and measure it against fp32")
    o.set_defaults(fn=cmd_export)
    from tnllm.testing._check import add_parser as add_check_parser
    add_check_parser(sub)                              # tnllm check: the tnllm.testing property suite

    bn = sub.add_parser("bench", help="benchmarks on this machine")
    bsub = bn.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bd = bsub.add_parser("decode", formatter_class=fmt,
                         help="decode ms/token, tokens/s and %% of the roofline: TNL paths vs the Transformer baseline")
    from .bench_decode import add_args as add_bench_decode_args
    add_bench_decode_args(bd)
    bd.set_defaults(fn=cmd_bench_decode)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (docs/serve.md)")
    from .serve import add_serve_args
    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"tnllm {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tnllm {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
