"""Low-precision copies of the weights, cast once a step instead of at every call.

Under bf16 (or fp16) autocast each linear and convolution casts its fp32 weight and bias to
the low precision when it runs, and the backward widens their gradients back to fp32: one
cast operator a weight forward, another backward, each a kernel launch on a GPU. In one
process the step can instead keep a low-precision copy of each of those weights:

- `refresh` writes every copy from its fp32 weight in one foreach operator, once a step
  (the copies serve all of the step's micro-batches; the weights change only after them);
- `swapped` runs the networks on the copies (autocast casts nothing already in its dtype),
  forward and backward, so that a block recomputed in the backward reads them too;
- the backward takes the copies' gradients, and `add_into_grad` widens them into the fp32
  weights' `.grad` in one foreach operator.

The arithmetic is autocast's, bit for bit: the same weights rounded the same way, the same
low-precision gradients, widened exactly (`tests/train/test_weight_copies.py`). Only the
weights autocast would cast are copied: those of `nn.Linear` and `nn.Conv2d`. The fp32
weights stay the model's: the optimizer, the EMA and checkpoints never see a copy.

Not used where gradients leave through the engine's per-weight hooks (DDP, FSDP, timm's
reentrant recomputation: they would land in the copies), or where the step is compiled (the
compiler fuses the casts itself).
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

CAST_BY_AUTOCAST = (nn.Linear, nn.Conv2d)


def usable(dtype: torch.dtype, distributed: bool, reentrant_recompute: bool) -> bool:
    """Whether a step may run on copies (see the module's docstring)."""
    return dtype in (torch.bfloat16, torch.float16) and not (distributed or reentrant_recompute)


class WeightCopies:
    """A low-precision copy of each linear's and convolution's weight and bias in `modules`."""

    def __init__(self, modules: Iterable[nn.Module], dtype: torch.dtype):
        self._slots = []  # (module, attribute, fp32 weight, copy)
        for root in modules:
            for module in root.modules():
                if not isinstance(module, CAST_BY_AUTOCAST):
                    continue
                for name, weight in module.named_parameters(recurse=False):
                    copy = torch.empty_like(weight, dtype=dtype).requires_grad_(weight.requires_grad)
                    self._slots.append((module, name, weight, copy))
        self._weights = [s[2] for s in self._slots]
        self._copies = [s[3] for s in self._slots]
        self._weight_of = {id(s[3]): s[2] for s in self._slots}
        self._grads = {}  # id(fp32 weight) -> the buffer its gradient is widened into, kept from step to step

    def __len__(self) -> int:
        return len(self._slots)

    @torch.no_grad()
    def refresh(self) -> None:
        """Every copy from its fp32 weight, in one operator."""
        torch._foreach_copy_(self._copies, self._weights)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules hold the copies in place of their weights for as long as this lasts."""
        for module, name, _, copy in self._slots:
            module._parameters[name] = copy
        try:
            yield
        finally:
            for module, name, weight, _ in self._slots:
                module._parameters[name] = weight

    def weight_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The fp32 weight a copy was cast from; any other tensor is its own."""
        return self._weight_of.get(id(tensor), tensor)

    def grad_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self._grads.get(id(weight))
        if buffer is None:  # the layout of the weight, as the engine gives a .grad
            buffer = self._grads[id(weight)] = torch.empty_like(weight)
        return buffer


def add_into_grad(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                  copies: WeightCopies | None = None) -> None:
    """Each gradient added into its weight's `.grad`, as `loss.backward()` leaves it, in at most
    two foreach operators: where `.grad` is None it becomes the gradient (a copy's, widened
    into a kept buffer), else the gradient is added. A None gradient (a weight the loss does
    not reach) leaves `.grad` as it is. `params` may hold `copies`' copies in place of weights."""
    widen_into, widen_from, held, adding = [], [], [], []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        weight = copies.weight_of(p) if copies is not None else p
        if weight.grad is not None:  # the micro-batches after the first add theirs
            held.append(weight.grad)
            adding.append(g)
        elif weight is p:
            weight.grad = g
        else:
            weight.grad = copies.grad_buffer(weight)
            widen_into.append(weight.grad)
            widen_from.append(g)
    if widen_into:
        torch._foreach_copy_(widen_into, widen_from)
    if held:
        torch._foreach_add_(held, adding)
