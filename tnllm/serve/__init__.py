"""``tnllm serve``: an OpenAI-compatible HTTP server with continuous batching over the recurrent state.

* ``tnllm.serve.backend.SlotBatch``: the static rows of a batched state (the only model calls);
* ``tnllm.serve.engine.Engine``: the background thread that batches requests over those rows;
* ``tnllm.serve.app.CompletionServer``: the Starlette routes; ``serve()`` runs them under uvicorn.

The web stack (starlette, uvicorn) is the ``serve`` extra: ``pip install "tnllm[serve]"``.
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
import time


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The ``tnllm serve`` options (tnllm.cli builds the parser)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory (its latest checkpoint) or checkpoint folder")
    src.add_argument("--preset", help="serve a randomly initialised model of this preset (for benchmarks) with "
                                      "the byte tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: a free one, which the ready line names)")
    p.add_argument("--max-batch", type=int, default=16, help="slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get HTTP 503")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--prefill-budget", type=int, default=4096,
                   help="prompt tokens prefilled between two decode steps while streams run")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16", "fp64"), default="auto",
                   help="weights dtype (auto: the checkpoint's; --preset: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's own choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (per slot-count bucket)")
    p.add_argument("--decode-path", choices=("auto", "aten", "kernel", "fused"), default="auto",
                   help="how the decode step runs: auto (the fused step on CUDA where the model allows it, "
                        "else model.step), aten (model.step, bit-identical to tnllm.generate), kernel (the "
                        "token mixer as one Triton kernel), fused (six device operations per layer)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    p.add_argument("--model-name", default=None,
                   help="the model id of /v1/models (default: the checkpoint folder's name, or tnllm-PRESET)")
    p.add_argument("--seed", type=int, default=0, help="weights seed for --preset")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")


def _positive(name: str, v: int, low: int = 1) -> None:
    if v < low:
        raise ValueError(f"--{name} must be >= {low}, got {v}")


def load_for_serving(a):
    """(model, tokenizer, model name) from the parsed options."""
    import torch
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "fp64": torch.float64}[a.dtype]
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.ckpt is not None:
        from ..checkpoints import load_model, resolve_checkpoint
        from ..model import TransNormerLLM
        path = resolve_checkpoint(a.ckpt)
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        if not isinstance(model, TransNormerLLM):
            raise ValueError(f"--ckpt {a.ckpt!r} holds a {type(model).__name__}: tnllm serve batches the fixed-size "
                             "recurrent state of a TransNormerLLM checkpoint")
        name = a.model_name or (path.parent.name if path.name.startswith("step-") else path.name)
        return model, tokenizer, name
    from ..config import TransNormerConfig
    from ..model import TransNormerLLM
    from ..tokenizer import ByteTokenizer
    cfg = TransNormerConfig.from_preset(a.preset)
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = TransNormerLLM(cfg)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(dtype).eval(), ByteTokenizer(), a.model_name or f"tnllm-{a.preset}"


def build_server(model, tokenizer, name: str, a):
    """A started ``Engine`` and its ``CompletionServer`` (whose ``.app`` uvicorn runs)."""
    from .app import CompletionServer
    from .engine import Engine
    engine = Engine(model, tokenizer, max_batch=a.max_batch, max_queue=a.max_queue, prefill_budget=a.prefill_budget,
                    cuda_graph=False if a.no_cuda_graph else None, compile=a.compile,
                    decode_path=a.decode_path)
    engine.start()
    return CompletionServer(engine, tokenizer, name, max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens,
                            max_positions=getattr(model.config, "max_position_embeddings", None))


def serve(a) -> int:
    """Load, start the engine (CUDA graphs captured before the port opens), run uvicorn until interrupted."""
    for name in ("max_batch", "max_prompt_tokens", "max_tokens", "prefill_budget"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("max-queue", a.max_queue, 0)
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65536), got {a.port}")
    try:
        import uvicorn
    except ImportError:
        raise ValueError('tnllm serve needs the web stack: pip install "tnllm[serve]" (starlette, uvicorn)') from None
    if a.threads is not None:
        _positive("threads", a.threads)
        import torch
        torch.set_num_threads(a.threads)
    sock = _bind(a.host, a.port)
    port = sock.getsockname()[1]
    t0 = time.perf_counter()
    model, tokenizer, name = load_for_serving(a)
    server = build_server(model, tokenizer, name, a)
    slots = server.engine.slots
    print(f"tnllm serve: {name} ({model.num_params() / 1e6:.1f}M params, {next(model.parameters()).dtype}) on "
          f"{slots.device}, {a.max_batch} slots of {slots.state_bytes_per_slot() / 2**20:.2f} MiB state each"
          f"{', CUDA graphs' if slots.cuda_graph else ''}; ready in {time.perf_counter() - t0:.1f}s; "
          f"http://{a.host}:{port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app, log_level=a.log_level, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def ready_url(log: str) -> str | None:
    """The base URL (``http://host:port``) that the ready line of ``tnllm serve`` names in its output ``log``, or
    None before that line is written: how a parent process finds the port that ``--port 0`` took."""
    m = re.search(r"; ready in [0-9.]+s; (http://\S+?:\d+)/v1", log)
    return m.group(1) if m else None


def _bind(host: str, port: int) -> socket.socket:
    """The listening address taken before the (slow) model load, so a busy port fails at once and port 0
    gets a free one whose number the ready line prints; connections are accepted once uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host/--port: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock
