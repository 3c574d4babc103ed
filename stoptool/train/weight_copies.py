"""Low-precision copies of the weights, cast once a step instead of at every call.

Under bf16 (or fp16) autocast each linear and convolution casts its fp32 weight and bias to
the low precision when it runs, and the backward widens their gradients back to fp32: one
cast operator a weight forward, another backward, each a kernel launch on a GPU. In one
process the step can instead keep a low-precision copy of each of those weights:

- `refresh` writes every copy from its fp32 weight in one foreach operator, once a step
  (the copies serve all of the step's micro-batches; the weights change only after them);
- `swapped` runs the networks on the copies (autocast casts nothing already in its dtype),
  forward and backward, so that a block recomputed in the backward reads them too;
- the backward takes the copies' gradients, and `add_into_grad` widens them into fp32
  `.grad` tensors in two foreach operators (one makes the tensors, one fills them).

The arithmetic is autocast's, bit for bit: the same weights rounded the same way, the same
low-precision gradients, widened exactly (`tests/train/test_weight_copies.py`). Only the
weights autocast would cast are copied: those of `nn.Linear` and `nn.Conv2d`, less any the
step also reads outside the layer's call (StoP's A, whose l1 penalty is taken in fp32). The
fp32 weights stay the model's: the optimizer, the EMA and checkpoints never see a copy. The
copies live from step to step (2 bytes a copied weight); the widened gradients are made each
step, as the engine makes them, and `zero_grad` frees them.

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
    """A low-precision copy of each linear's and convolution's weight and bias in `modules`,
    but for those in `keep` (weights the step also reads outside their layer's call)."""

    def __init__(self, modules: Iterable[nn.Module], dtype: torch.dtype, keep: Iterable[torch.Tensor] = ()):
        kept = {id(t) for t in keep}
        self._slots = []  # (module, attribute, fp32 weight, copy)
        for root in modules:
            for module in root.modules():
                if not isinstance(module, CAST_BY_AUTOCAST):
                    continue
                for name, weight in module.named_parameters(recurse=False):
                    if id(weight) in kept:
                        continue
                    copy = torch.empty_like(weight, dtype=dtype).requires_grad_(weight.requires_grad)
                    self._slots.append((module, name, weight, copy))
        self._weights = [s[2] for s in self._slots]
        self._copies = [s[3] for s in self._slots]
        self._weight_of = {id(s[3]): s[2] for s in self._slots}

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


def add_into_grad(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                  copies: WeightCopies | None = None) -> None:
    """Each gradient added into its weight's `.grad`, as `loss.backward()` leaves it, in a few
    foreach operators: where `.grad` is None it becomes the gradient (a copy's, widened to the
    weight's dtype), else the gradient is added. A None gradient (a weight the loss does not
    reach) leaves `.grad` as it is. `params` may hold `copies`' copies in place of weights."""
    narrow, widen, held, adding = [], [], [], []
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
            narrow.append(g)
            widen.append(weight)
    if widen:
        # fp32 tensors laid out like the weights, made in one operator (an out-of-place foreach
        # operator allocates its results), outside autograd; the copy overwrites them with the
        # gradients, exactly
        with torch.no_grad():
            widened = torch._foreach_mul(widen, 0.0)
            torch._foreach_copy_(widened, narrow)
        for weight, grad in zip(widen, widened, strict=True):
            weight.grad = grad
    if held:
        torch._foreach_add_(held, adding)
