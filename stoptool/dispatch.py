"""What a training step asks of the host: the operators it dispatches, by where they come from.

On a GPU whose step is short, the host's work per operator (5-20 µs of Python, dispatch and
launch each) can set the pace instead of the arithmetic. `stoptool bench --what host` counts
the operators one step dispatches on the CPU, where each is visible to `torch.profiler`: an
`aten::` operator counts when no other `aten::` operator encloses it (what the host dispatches,
not what an operator does inside). Each is put in the group of the nearest enclosing label:

- `encoder`, `target`, `predictor`: inside the context encoder's, the target encoder's or the
  predictor's forward;
- `loss`: the rest of the forward (normalising the images, the targets' layer norm and
  gathering, the smooth-L1);
- `backward`: run by the autograd engine;
- `optimizer`: inside `Optimizer.step` or `zero_grad`, or setting lr and wd;
- `ema`, `guard` (the gradient norms, the non-finite flag, clipping, the skip): those parts of
  `train_step`;
- `other`: anything else (the micro-batch bookkeeping).

The labels are `torch.profiler.record_function` ranges put around those parts for the count
only; the step itself is the one `pretrain` runs.
"""

import collections
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from stoptool.models import jepa as jepa_module
from stoptool.train import distributed as distributed_module
from stoptool.train import guard as guard_module
from stoptool.train import step as step_module
from stoptool.train.step import TrainState

GROUPS = ("encoder", "target", "predictor", "loss", "backward", "optimizer", "ema", "guard", "other")
LABEL = "stoptool."  # the prefix of the ranges put around a step's parts


@dataclass
class OpCount:
    total: int
    by_group: dict[str, int]  # GROUPS order, every group present
    by_op: dict[str, int]  # aten name -> count, most frequent first


def top_level_ops(events) -> Iterator[tuple[str, str]]:
    """(operator name, group) of every `aten::` event of a profile not nested in another."""
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        group, parent, nested = None, event.cpu_parent, False
        while parent is not None:
            name = parent.name
            if name.startswith("aten::"):
                nested = True
                break
            if group is None:
                group = _group_of(name)
            parent = parent.cpu_parent
        if not nested:
            yield event.name, group or "other"


def _group_of(range_name: str) -> str | None:
    if range_name.startswith(LABEL):
        return range_name[len(LABEL):]
    if range_name.startswith("autograd::engine"):
        return "backward"
    if range_name.startswith("Optimizer."):  # torch's own ranges: Optimizer.step#AdamW.step, zero_grad
        return "optimizer"
    return None


def count_ops(run: Callable[[], object]) -> OpCount:
    """The top-level operators one call of `run` dispatches, counted by group and by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    groups, ops = collections.Counter(), collections.Counter()
    for name, group in top_level_ops(prof.events()):
        groups[group] += 1
        ops[name] += 1
    return OpCount(sum(groups.values()), {g: groups.get(g, 0) for g in GROUPS}, dict(ops.most_common()))


@contextmanager
def labelled_step(state: TrainState) -> Iterator[None]:
    """`train_step`'s parts inside named ranges (see the module's docstring), for as long as
    the context lasts; nothing else changes."""
    with ExitStack() as stack:
        stack.enter_context(_module_range(state.model.predictor, "predictor"))
        for module, name, label in ((jepa_module, "encode", "encoder"),  # f_θ on the context, in `predict`
                                    (distributed_module, "encode", "target"),  # f̄_θ, in TargetNet
                                    (step_module, "loss_and_features", "loss"),
                                    (step_module, "ema_update", "ema"),
                                    (step_module, "clip_context_gradients", "guard"),
                                    (step_module, "optimizer_step", "optimizer"),
                                    (step_module, "set_hyperparams", "optimizer"),
                                    (guard_module.Guard, "inspect", "guard"),
                                    (guard_module.Guard, "skip", "guard")):
            stack.enter_context(_function_range(module, name, label))
        yield


@contextmanager
def _module_range(module: torch.nn.Module, label: str) -> Iterator[None]:
    ranges = []

    def enter(*_):
        ranges.append(torch.profiler.record_function(LABEL + label))
        ranges[-1].__enter__()

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    hooks = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _function_range(owner, name: str, label: str) -> Iterator[None]:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(LABEL + label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


def host_ms(run: Callable[[], object], steps: int, repeats: int) -> list[float]:
    """Milliseconds a call of `run` takes, the mean over `steps` calls, once per repeat."""
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(steps):
            run()
        out.append(1000 * (time.perf_counter() - began) / steps)
    return out
