"""Device and precision choices (what 'auto' means on this machine), and the preparation of a
model for them that training and `stoptool bench` share: attention kernel, recomputation,
autocast, compilation."""

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stoptool.data.prepare import available_cpus
from stoptool.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """The device `name` stands for. A GPU named by index becomes the current one, so that
    nothing (pinned-memory threads, libraries that use the current device) opens a context on
    GPU 0 beside it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but no CUDA GPU is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} "
                        f"CUDA GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device '{name}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 matmuls run several times faster than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: read the CPU flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


def slow_precision(precision: str, device: str) -> str | None:
    """Why `precision` asked for on `device` would crawl, where it would: bf16 on a CPU without
    bf16 instructions runs many times slower than fp32. None where it is fine."""
    if precision == "bf16" and resolve_device(device).type == "cpu" and not cpu_has_fast_bf16():
        return ("this CPU has neither AMX nor AVX-512 BF16, so bf16 runs many times slower than fp32 here; "
                "--precision auto picks fp32")
    return None


def gpu_has_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 and up (Ampere on). Older GPUs emulate it
    (slowly), which `torch.cuda.is_bf16_supported()` counts as support."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def environment() -> dict:
    """What results depend on beyond the config: stoptool's, torch's and timm's versions, the
    device `--device auto` picks here, and whether bf16 is fast on it (what `--precision auto`
    decides by). `stoptool --version` prints it; every run's summary.json records it."""
    from stoptool import __version__

    device = resolve_device("auto")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        auto, fast = f"cuda ({torch.cuda.get_device_name(device)})", major >= 8
        why = f"compute capability {major}.{minor}" + ("" if fast else ": --precision auto picks fp16 with a "
                                                        "gradient scaler")
    else:
        auto, fast = "cpu", cpu_has_fast_bf16()
        why = ("AMX or AVX-512 BF16" if fast
               else "this CPU has neither AMX nor AVX-512 BF16: --precision auto picks fp32")
    try:
        timm_version = importlib.metadata.version("timm")  # without importing timm (seconds)
    except importlib.metadata.PackageNotFoundError:
        timm_version = "not installed"
    return {"stoptool": __version__, "torch": torch.__version__, "timm": timm_version, "auto_device": auto,
            "fast_bf16": fast, "fast_bf16_why": why}


def resolve_precision(precision: str, device: torch.device, fp16: bool = True) -> str:
    """What `precision` means on `device`. "auto": bf16 where the hardware has it; on older GPUs
    fp16 (training, with a gradient scaler) or, with `fp16` False (forward-only extraction,
    where nothing guards against overflow), fp32; fp32 on CPUs without fast bf16."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("fp16 is for GPUs; use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if gpu_has_bf16(device) else ("fp16" if fp16 else "fp32")
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_factory(device: torch.device, precision: str):
    """A zero-argument callable returning the autocast context for this device and precision."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=DTYPES[precision])


def default_workers(device: torch.device, in_memory: bool, processes_per_node: int = 1) -> int:
    """Loader workers for one training process; the cores it may run on (a scheduler's CPU
    binding included) are shared by the node's processes."""
    cpus = max(1, available_cpus() // max(1, processes_per_node))
    if device.type == "cuda":
        return min(8, cpus)
    # On a CPU the loader competes with the step for cores; in-memory sets need no workers.
    return 0 if in_memory or cpus <= 2 else min(4, cpus // 4)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The timm blocks of `model` (encoders' and predictor's): the unit `--compile` compiles."""
    return [m for m in model.modules() if type(m).__name__ == "Block"]


def compile_blocks(model, autocast=contextlib.nullcontext) -> str | None:
    """torch.compile every transformer block in place (state-dict keys unchanged).

    Returns None on success, or the reason compilation is unavailable (the caller says so
    and runs eagerly). One block of each width is run forward and backward under `autocast`
    on a small input first, so that a missing compiler or a broken kernel cache shows up
    here, not in the middle of training.
    """
    blocks = transformer_blocks(model)
    try:
        for block in blocks:
            block.compile(dynamic=True)
        probes = {b.norm1.normalized_shape[0]: b for b in blocks}
        for width, block in probes.items():
            param = next(block.parameters())
            x = torch.zeros(2, 5, width, device=param.device, dtype=param.dtype, requires_grad=True)
            with autocast():
                out = block(x)
            out.float().sum().backward()
            for p in block.parameters():
                p.grad = None
    except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
        uncompile_blocks(model)
        return _reason(err)
    return None


def uncompile_blocks(model) -> None:
    """Undo `compile_blocks`: every block runs eagerly again, with no gradient left behind."""
    for block in transformer_blocks(model):
        block._compiled_call_impl = None
        for p in block.parameters():
            p.grad = None


def is_compile_failure(err: BaseException) -> bool:
    """An error of torch.compile's own machinery (dynamo, inductor), not of the model."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def compiled(fn: Callable, dynamic: bool | None = None, cuda_graphs: bool = False) -> Callable:
    """torch.compile(fn): how a training step's forward and backward are compiled, as one
    graph (`dynamic=False`: one graph per shape, for bucketed masks).

    `cuda_graphs` (a GPU's): torch.compile's reduce-overhead mode, which records each graph's
    kernels once and replays them with one launch. Each call is marked as a new step of the
    graphs, and its outputs (tensors) are copied out of the graphs' memory, which the next
    replay writes over. Not yet run on a GPU (no GPU was lent for it); on a CPU the mode
    compiles as without it."""
    if not cuda_graphs:
        return torch.compile(fn, dynamic=dynamic)
    graphs = torch.compile(fn, dynamic=dynamic, mode="reduce-overhead")

    def replayed(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in graphs(*args))

    return replayed


def eager_on_compile_failure(run, undo, on_failure):
    """`run()`; if torch.compile fails inside it (a graph first met there, a broken kernel
    cache), `undo()` the compilation, tell `on_failure(reason)` and run again.

    Safe for a training step: compilation happens in the forward and backward, before the
    optimizer touches a weight, and the retry starts from cleared gradients.
    """
    try:
        return run()
    except Exception as err:
        if not is_compile_failure(err):
            raise
        undo()
        on_failure(_reason(err))
        return run()


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def attention_impl(requested: str, device: torch.device, precision: str, training: bool = True) -> str:
    """'sdpa' (fused scaled_dot_product_attention) or 'math' (q kᵀ, softmax, · v).

    'auto' picks math for bf16 training on the CPU: there the fused CPU kernel's backward
    makes forward + backward 2–3× slower than the plain matmuls on the short sequences of
    I-JEPA (docs/performance.md). Everywhere else, forward-only work (feature extraction)
    included, the fused kernel wins.
    """
    if requested != "auto":
        return requested
    return "math" if training and device.type == "cpu" and precision == "bf16" else "sdpa"


def set_attention(model: torch.nn.Module, impl: str) -> None:
    """Switch every timm attention layer of `model` to the fused or the plain path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = impl == "sdpa"


@dataclass
class Prepared:
    """How a prepared model runs."""

    precision: str  # bf16 | fp16 | fp32
    autocast: Callable[[], contextlib.AbstractContextManager]
    attn: str  # sdpa | math
    compiled: bool
    compile_failure: str | None = None  # why compilation is unavailable, where it was asked for


def prepare_model(model, device: torch.device, precision: str, attn: str = "auto",
                  grad_checkpoint: bool = False, compile: bool = False, training: bool = True) -> Prepared:
    """Set `model` (a JEPA) up to run on `device` in `precision`: the attention kernel that
    'auto' picks there, activation recomputation, and, where asked and possible, compiled
    blocks for forward-only work (`training=False`; a training step is compiled whole, see
    `train.step.compile_forward`)."""
    impl = attention_impl(attn, device, precision, training)
    set_attention(model, impl)
    if grad_checkpoint:
        model.encoder.set_grad_checkpointing(True)
        model.predictor.grad_checkpointing = True
    autocast = autocast_factory(device, precision)
    failure = compile_blocks(model, autocast) if compile and not training else None
    return Prepared(precision, autocast, impl, compile and failure is None, failure)


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(seconds_at_256: float, largest: int, most_seconds: float = 1.0) -> int:
    """The side of the square matmuls that measure the rate: `largest`, unless one product
    would take over `most_seconds` (a product 2× wider takes 8× longer), judged from one
    256² product. bf16 on a CPU without bf16 instructions runs at about 1 GFLOP/s or less: 54 s
    a 2048² product on an AVX2 machine, 0.2 s a 512² one."""
    n, seconds = 256, seconds_at_256
    while n < largest and seconds * 8 <= most_seconds:
        n, seconds = 2 * n, seconds * 8
    return n


def matmul_rate(device: torch.device, precision: str, n: int | None = None, reps: int = 10) -> float:
    """The device's measured dense matmul rate (FLOP/s) in this precision: 2048² matmuls on a
    CPU, 8192² on a GPU (smaller ones leave a GPU's tensor cores part idle), smaller where
    these would take over a second each (see `matmul_size`); at most `reps` products a timing,
    fewer where they take over 0.05 s each, best of 3 timings."""
    dtype = DTYPES[precision]

    gen = torch.Generator(device).manual_seed(0)  # not the global stream: a run measures this mid-way

    def product(side: int):
        a = torch.randn(side, side, device=device, generator=gen).to(dtype)
        b = torch.randn(side, side, device=device, generator=gen).to(dtype)
        return lambda: a @ b

    def seconds_of_one(run) -> float:  # after a first, untimed call
        run()
        device_sync(device)
        t = time.perf_counter()
        run()
        device_sync(device)
        return time.perf_counter() - t

    if n is None:
        n = matmul_size(seconds_of_one(product(256)), 8192 if device.type == "cuda" else 2048)
    run = product(n)
    reps = max(1, min(reps, int(0.5 / max(seconds_of_one(run), 1e-9))))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            run()
        device_sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cached_matmul_rate(device: torch.device, precision: str) -> float:
    """`matmul_rate`, measured once per machine, device, precision and torch and then read from
    ~/.cache/stoptool/matmul-rate.json (the denominator of a run's `mfu`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    key = f"{name} | {precision} | torch {torch.__version__}"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(base) / "stoptool" / "matmul-rate.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = matmul_rate(device, precision)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache: measured again next time
    return known[key]
