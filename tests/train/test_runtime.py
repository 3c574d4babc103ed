"""Device, precision and attention choices."""

import pytest
import torch

from stoptool.errors import UserError
from stoptool.models.encoder import build_encoder, encode
from stoptool.train.runtime import attention_impl, resolve_device, resolve_precision, set_attention


def test_auto_attention_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_impl("auto", cpu, "bf16") == "math"
    assert attention_impl("auto", cpu, "fp32") == "sdpa"
    assert attention_impl("auto", cuda, "bf16") == "sdpa"
    assert attention_impl("sdpa", cpu, "bf16") == "sdpa"
    assert attention_impl("auto", cpu, "bf16", training=False) == "sdpa"  # extraction: forward only


def test_both_attention_paths_compute_the_same_features():
    torch.manual_seed(0)
    model = build_encoder("vit_t4", 16).eval()
    x = torch.randn(2, 3, 16, 16)
    set_attention(model, "sdpa")
    fused = encode(model, x)
    set_attention(model, "math")
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    assert torch.allclose(encode(model, x), fused, atol=1e-5)


def test_device_and_precision_errors():
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu:banana")
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert current == [torch.device("cuda:1")]  # the named GPU becomes the current one
    assert resolve_device("cuda") == torch.device("cuda") and len(current) == 1
    message = r"'cuda:7' asked for, but this machine has 2 CUDA GPU\(s\): use cuda:0 to cuda:1"
    with pytest.raises(UserError, match=message):
        resolve_device("cuda:7")


@pytest.mark.parametrize("capability, training, extraction", [
    ((9, 0), "bf16", "bf16"),  # Hopper
    ((8, 0), "bf16", "bf16"),  # Ampere
    ((7, 5), "fp16", "fp32"),  # Turing: bf16 only emulated; fp16 needs the scaler training has
    ((7, 0), "fp16", "fp32"),  # Volta
])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, training,
                                                                extraction):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    gpu = torch.device("cuda", 1)
    assert resolve_precision("auto", gpu) == training
    assert resolve_precision("auto", gpu, fp16=False) == extraction
    assert resolve_precision("fp32", gpu) == "fp32" and asked == [gpu, gpu]  # the chosen GPU's


def test_a_process_past_the_node_gpus_is_refused(monkeypatch):
    from stoptool.train.distributed import World, init_world

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"process 2 of this node has no GPU: the node has 2 GPUs; "
                                        r"launch at most that many processes per node"):
        init_world(World(rank=2, size=4, local_rank=2, local_size=4), torch.device("cuda"))


class FakeInductorError(RuntimeError):
    """Stands for an error of torch.compile's backend (a missing compiler, a broken cache)."""


FakeInductorError.__module__ = "torch._inductor.exc"


def test_compile_failure_in_a_training_step_falls_back_to_eager(tiny_cfg, tmp_path, monkeypatch):
    # A compiled step that fails the way one fails on a graph first met in training.
    import stoptool.train.runtime as runtime_module
    from stoptool.train.pretrain import pretrain

    def failing_compile(fn, dynamic=None, cuda_graphs=False):
        def fail(*args, **kwargs):
            raise FakeInductorError("ImportError: kernel.so: file too short")

        return fail

    monkeypatch.setattr(runtime_module, "compiled", failing_compile)
    notes = []
    compiled = pretrain(tiny_cfg(steps=3, compile=True, out=str(tmp_path / "c")), notify=notes.append)
    eager = pretrain(tiny_cfg(steps=3, out=str(tmp_path / "e")))
    assert notes == ["torch.compile failed at step 0, running eagerly from here "
                     "(FakeInductorError: ImportError: kernel.so: file too short)"]
    assert compiled.step == 3 and compiled.loss == eager.loss  # the failed step was retried exactly


def test_eager_on_compile_failure_leaves_other_errors_alone():
    from stoptool.train.runtime import eager_on_compile_failure

    model = build_encoder("vit_n2", 8)
    calls, reasons = [], []

    def run():
        calls.append(1)
        raise ValueError("a bug in the model, not in the compiler")

    with pytest.raises(ValueError):
        eager_on_compile_failure(run, model, reasons.append)
    assert len(calls) == 1 and reasons == []


def test_default_workers_count_the_cores_the_process_may_run_on(monkeypatch):
    """A scheduler binding the job to 4 of a node's 64 cores gets workers for 4, not 64."""
    import os

    from stoptool.train.runtime import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_workers(cuda, False) == 4 and default_workers(cuda, False, processes_per_node=2) == 2
    assert default_workers(cpu, False) == 1 and default_workers(cpu, True) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(cuda, False) == 8 and default_workers(cpu, False) == 4
