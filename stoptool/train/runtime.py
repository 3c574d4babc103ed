"""Device and precision choices (what 'auto' means on this machine), and the preparation of a
model for them that training and `stoptool bench` share: attention kernel, recomputation,
autocast, compilation."""

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

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


def gpu_has_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 and up (Ampere on). Older GPUs emulate it
    (slowly), which `torch.cuda.is_bf16_supported()` counts as support."""
    return torch.cuda.get_device_capability(device)[0] >= 8


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
    """Loader workers for one training process; the node's cores are shared by its processes."""
    cpus = max(1, (os.cpu_count() or 1) // max(1, processes_per_node))
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


def eager_on_compile_failure(run, model, on_failure):
    """`run()`; if torch.compile fails inside it (a graph first met there, a broken kernel
    cache), put `model`'s blocks back to eager, tell `on_failure(reason)` and run again.

    Safe for a training step: compilation happens in the forward and backward, before the
    optimizer touches a weight, and the retry starts from cleared gradients.
    """
    try:
        return run()
    except Exception as err:
        if not is_compile_failure(err):
            raise
        uncompile_blocks(model)
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
    'auto' picks there, activation recomputation, and compiled blocks where asked and possible."""
    impl = attention_impl(attn, device, precision, training)
    set_attention(model, impl)
    if grad_checkpoint:
        model.encoder.set_grad_checkpointing(True)
        model.predictor.grad_checkpointing = True
    autocast = autocast_factory(device, precision)
    failure = compile_blocks(model, autocast) if compile else None
    return Prepared(precision, autocast, impl, compile and failure is None, failure)
