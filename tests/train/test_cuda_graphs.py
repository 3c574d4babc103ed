"""`--cuda-graphs`: the compiled step replayed as CUDA graphs. No GPU has run it yet; on the CPU
these tests check what reaches torch.compile, what comes back to the step, and the messages."""

import pytest
import torch

from stoptool.bench import bench
from stoptool.config import BenchConfig
from stoptool.errors import UserError
from stoptool.models.jepa import build_jepa
from stoptool.train import runtime
from stoptool.train.distributed import World
from stoptool.train.state import build_state


def test_graphs_get_a_step_mark_and_hand_back_copies_of_their_outputs(monkeypatch):
    modes, marks = [], []
    held = (torch.arange(3.0), torch.ones(2))  # what a replay's memory holds

    def fake_compile(fn, dynamic=None, mode=None):
        modes.append(mode)
        return lambda *args: held

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    plain = runtime.compiled(lambda: None)
    replayed = runtime.compiled(lambda: None, dynamic=False, cuda_graphs=True)
    assert modes == [None, "reduce-overhead"]
    out = replayed()
    assert len(marks) == 1 and plain() is held
    for copy, original in zip(out, held, strict=True):
        assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr()


def test_cuda_graphs_without_compile_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="cuda_graphs replays the compiled step: add --compile"):
        BenchConfig(cuda_graphs=True).validate()
    with pytest.raises(UserError, match="add --compile"):
        tiny_cfg(cuda_graphs=True)
    # a replay writes over the last one's gradients, and records a graph per mask shape
    with pytest.raises(UserError, match="accum_steps 2 would have each micro-batch overwrite"):
        tiny_cfg(compile=True, cuda_graphs=True, mask_bucket=8, accum_steps=2)
    with pytest.raises(UserError, match="round the context lengths with masks.bucket"):
        tiny_cfg(compile=True, cuda_graphs=True)
    with pytest.raises(UserError, match="accum_steps 2"):
        BenchConfig(compile=True, cuda_graphs=True, batch_size=8, accum_steps=2).validate()
    with pytest.raises(UserError, match="masks.bucket"):
        BenchConfig(compile=True, cuda_graphs=True, vary_masks=True).validate()
    BenchConfig(compile=True, cuda_graphs=True).validate()  # one fixed batch: one mask shape


def test_on_a_cpu_the_step_is_compiled_without_graphs_and_says_so(tiny_cfg, monkeypatch):
    asked = []

    def record(fn, dynamic=None, cuda_graphs=False):
        asked.append(cuda_graphs)
        return fn  # run eagerly: what is checked is the request

    monkeypatch.setattr(runtime, "compiled", record)
    cfg = tiny_cfg(compile=True, cuda_graphs=True, mask_bucket=8)
    notes = []
    state, compiled = build_state(cfg, build_jepa(cfg.model), None, World(), torch.device("cpu"), "fp32",
                                  notes.append)
    assert compiled and state.forward is not None and asked == [False]
    assert notes == ["cuda_graphs replays a step on a GPU; on cpu the step is compiled without them"]
    result = bench(BenchConfig(arch="vit_n2", img_size=16, batch_size=2, pred_depth=1, pred_width=48,
                               precision="fp32", compile=True, cuda_graphs=True, steps=1, warmup=0,
                               repeats=1))
    assert asked == [False, False] and result["compiled"] and result["cuda_graphs"] is False
