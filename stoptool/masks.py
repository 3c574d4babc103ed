"""Multi-block masks (I-JEPA) sampled for a whole batch at once.

Per batch one target-block size and one context-block size are drawn (scale and aspect
ratio share one uniform draw, as in I-JEPA); per image `num_targets` target blocks and one
context block are placed uniformly at random, and the context block drops every target
patch. A context that keeps `min_keep` patches or fewer is placed again (and, if that keeps
failing, the image's targets are redrawn too), so context and targets never overlap.
Finally every mask of one kind is cut to the batch's shortest so they stack.

Indices are raster-order patch indices into the `grid × grid` patch grid.
"""

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from stoptool.errors import UserError, plural
from stoptool.models.archs import check_grid
from stoptool.options import PAIR, check_fields, option

MaskMode = Literal["multiblock", "random"]


@dataclass(frozen=True)
class MaskConfig:
    """The mask settings (the `masks` section of a pretraining config). `grid` is not one of
    them: it follows from the image and patch size, and is set with `on_grid`."""

    num_targets: int = option(4, "Target blocks per image.", low=1)
    target_scale: PAIR = option((0.15, 0.2), "Target block scale MIN,MAX (share of the patches).")
    target_aspect: PAIR = option((0.75, 1.5), "Target block aspect ratio MIN,MAX.")
    context_scale: PAIR = option((0.85, 1.0), "Context block scale MIN,MAX.")
    context_aspect: PAIR = option((1.0, 1.0), "Context block aspect ratio MIN,MAX.")
    min_keep: int | None = option(None, "A mask keeps more than this many patches.", low=0,
                                  default_text="10; on grids under 14×14, scaled down with the patch count")
    mode: MaskMode = option("multiblock", "Masks: multiblock (I-JEPA) | random (MAE-style).", key="mask_mode")
    bucket: int = option(0, "Round each batch's context length down to a multiple of N patches, so that "
                         "a compiled step meets few shapes (0: the exact lengths, as the released code).",
                         low=0, key="mask_bucket")
    grid: int | None = None  # patches a side

    def on_grid(self, grid: int) -> "MaskConfig":
        return replace(self, grid=grid)

    @property
    def keep(self) -> int:
        """min_keep: I-JEPA's 10 patches, scaled down with the number of patches on grids
        smaller than its 14×14 (never up: 224 px with 14-px patches keeps 10 too)."""
        if self.min_keep is not None:
            return self.min_keep
        return min(10, max(1, round(10 * self.grid * self.grid / 196)))

    def validate(self) -> "MaskConfig":
        check_fields(self)
        for name in ("target_scale", "context_scale"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi <= 1):
                raise UserError(f"{name} must satisfy 0 < min <= max <= 1, got {lo}, {hi}", key=name)
        for name in ("target_aspect", "context_aspect"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise UserError(f"{name} must satisfy 0 < min <= max, got {lo}, {hi}", key=name)
        if self.grid is None:
            raise ValueError("MaskConfig.grid is unset: call on_grid first")
        check_grid(self.grid, "the image size")
        if self.grid < 2:
            raise UserError(f"the patch grid must be at least 2×2, got {self.grid}×{self.grid}")
        areas = [h * w for h, w in self.block_sizes("target")]
        if min(areas) <= self.keep:
            raise UserError(
                f"target blocks of scale {self.target_scale[0]} on a {self.grid}×{self.grid} grid "
                f"hold {plural(min(areas), 'patch')}, not more than min_keep {self.keep}: raise the scale "
                "or lower min_keep"
            )
        left = self.grid * self.grid - self.num_targets * max(areas)
        if self.mode == "random" and left <= self.keep:
            raise UserError(
                f"random masking with {self.num_targets} targets of up to {plural(max(areas), 'patch')} "
                f"on a {self.grid}×{self.grid} grid leaves {plural(max(left, 0), 'context patch')}, "
                f"not more than min_keep {self.keep}: lower num_targets or the target scale"
            )
        if self.mode == "multiblock":
            self._check_context()
        return self

    def block_sizes(self, kind: str) -> list[tuple[int, int]]:
        """The block sizes (h, w) that `kind` ("target" or "context") can take. Scale and aspect
        share one draw, so scanning that draw finds them all, the extremes included."""
        lo, hi = getattr(self, f"{kind}_scale")
        aspect = getattr(self, f"{kind}_aspect")
        return [block_size(self.grid, lo + u / 64 * (hi - lo), *aspect, u / 64) for u in range(65)]

    def _check_context(self) -> None:
        """Refuse, before any training, a context block that cannot keep more than min_keep
        patches: one too small by itself, or one that the largest targets leave no room for
        (tried on 64 rows with a tenth of the sampler's retries: a size pair that needs more
        would stall or stop training sooner or later)."""
        smallest = min(self.block_sizes("context"), key=lambda hw: hw[0] * hw[1])
        if smallest[0] * smallest[1] <= self.keep:
            raise UserError(
                f"context blocks of scale {self.context_scale[0]} on a {self.grid}×{self.grid} grid "
                f"hold {plural(smallest[0] * smallest[1], 'patch')}, not more than min_keep {self.keep}: "
                "raise the context scale or lower min_keep"
            )
        largest = max(self.block_sizes("target"), key=lambda hw: hw[0] * hw[1])
        _multiblock(self, 64, torch.Generator().manual_seed(0), largest, smallest, rounds=10)


def block_size(grid: int, scale: float, ar_lo: float, ar_hi: float, u: float) -> tuple[int, int]:
    """Height and width of a block from one uniform draw u (I-JEPA's rule), at most grid - 1."""
    area = int(grid * grid * scale)
    aspect = ar_lo + u * (ar_hi - ar_lo)
    h = max(1, round(math.sqrt(area * aspect)))
    w = max(1, round(math.sqrt(area / aspect)))
    return min(h, grid - 1), min(w, grid - 1)


def _corners(grid: int, h: int, w: int, shape: tuple[int, ...], gen: torch.Generator):
    """Top-left corners of h×w boxes, uniform over every position where the box fits."""
    top = torch.randint(0, grid - h + 1, shape, generator=gen, dtype=torch.int16)
    left = torch.randint(0, grid - w + 1, shape, generator=gen, dtype=torch.int16)
    return top, left


def _box_indices(grid: int, h: int, w: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Raster-order patch indices [*shape, h*w] of boxes with the given corners."""
    offsets = (torch.arange(h)[:, None] * grid + torch.arange(w)[None, :]).flatten()
    return (top.long() * grid + left.long())[..., None] + offsets


def _box_masks(grid: int, h: int, w: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Boolean [*shape, grid*grid] masks of boxes with the given corners."""
    r = torch.arange(grid, dtype=torch.int16)
    rows = (r >= top[..., None]) & (r < top[..., None] + h)
    cols = (r >= left[..., None]) & (r < left[..., None] + w)
    return (rows[..., :, None] & cols[..., None, :]).flatten(-2)


def _first_k(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Raster-order indices of the first k True entries of each row (every row has >= k)."""
    count = torch.int16 if mask.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    keep = mask & (mask.cumsum(-1, dtype=count) <= k)
    return keep.nonzero()[:, -1].view(*mask.shape[:-1], k)


def _multiblock(
    c: MaskConfig,
    batch: int,
    gen: torch.Generator,
    target: tuple[int, int],
    context: tuple[int, int],
    max_tries: int = 20,
    rounds: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-block masks with blocks of the given sizes: ctx_idx [B, Nc], tgt_idx [B, M, th*tw].

    A row whose context keeps too few patches draws a new context box; after `max_tries`
    such draws its targets are placed anew too. After `rounds` of that, give up."""
    n = c.grid * c.grid
    (th, tw), (ch, cw) = target, context

    def place(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target indices [rows, M, th*tw] and the patches they cover [rows, N]."""
        targets = _box_indices(c.grid, th, tw, *_corners(c.grid, th, tw, (rows, c.num_targets), gen))
        covered = torch.zeros(rows, n, dtype=torch.bool)
        covered.scatter_(1, targets.flatten(1), True)
        return targets, covered

    targets, covered = place(batch)
    context = _box_masks(c.grid, ch, cw, *_corners(c.grid, ch, cw, (batch,), gen)) & ~covered
    bad = context.sum(-1) <= c.keep
    tries = 0
    while bad.any():
        rows = int(bad.sum())
        tries += 1
        if tries % max_tries == 0:  # this context size cannot avoid these targets
            targets[bad], covered[bad] = place(rows)
        box = _box_masks(c.grid, ch, cw, *_corners(c.grid, ch, cw, (rows,), gen))
        context[bad] = box & ~covered[bad]
        bad = context.sum(-1) <= c.keep
        if tries > rounds * max_tries:
            raise UserError(
                f"cannot place a context block of {ch}×{cw} that keeps more than {c.keep} "
                f"patches beside {c.num_targets} targets of {th}×{tw} on a {c.grid}×{c.grid} "
                "grid: lower the target scale or min_keep"
            )
    n_ctx = bucketed(int(context.sum(-1).min()), c.bucket, c.keep)
    return _first_k(context, n_ctx), targets


def bucketed(n_ctx: int, bucket: int, keep: int) -> int:
    """`n_ctx` rounded down to a multiple of `bucket` (0: as it is), unless that would keep
    `keep` patches or fewer."""
    if not bucket:
        return n_ctx
    rounded = n_ctx - n_ctx % bucket
    return rounded if rounded > keep else n_ctx


class MaskSampler:
    """Callable: `sampler(batch_size, gen)` -> (ctx_idx [B, Nc], tgt_idx [B, M, K])."""

    def __init__(self, cfg: MaskConfig, max_tries: int = 20):
        self.cfg = cfg.validate()
        self.max_tries = max_tries

    def __call__(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.mode == "random":
            return self._random(batch, gen)
        target, context = self._sizes(gen)
        return _multiblock(self.cfg, batch, gen, target, context, self.max_tries)

    def _sizes(self, gen: torch.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
        c = self.cfg
        u_t, u_c = torch.rand(2, generator=gen).tolist()
        t_scale = c.target_scale[0] + u_t * (c.target_scale[1] - c.target_scale[0])
        c_scale = c.context_scale[0] + u_c * (c.context_scale[1] - c.context_scale[0])
        return (
            block_size(c.grid, t_scale, *c.target_aspect, u_t),
            block_size(c.grid, c_scale, *c.context_aspect, u_c),
        )

    def _random(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE-style: targets are random patch sets of the block sizes; context is the rest."""
        c = self.cfg
        (th, tw), (ch, cw) = self._sizes(gen)
        n = c.grid * c.grid
        n_tgt = th * tw
        perm = torch.argsort(torch.rand(batch, n, generator=gen), dim=-1)
        tgt = perm[:, : c.num_targets * n_tgt].reshape(batch, c.num_targets, n_tgt)
        rest = perm[:, c.num_targets * n_tgt :]
        n_ctx = max(c.keep + 1, min(rest.size(1), round(ch * cw * rest.size(1) / n)))
        n_ctx = bucketed(n_ctx, c.bucket, c.keep)
        if rest.size(1) <= c.keep:
            raise UserError("random masking leaves too few context patches: lower the target scale")
        return rest[:, :n_ctx].sort(-1).values, tgt.sort(-1).values
