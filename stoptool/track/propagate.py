"""Label propagation through a video by patch-feature affinities: the protocol of DINO's
`eval_video_segmentation.py` (after Jabri et al. 2020), its settings as options.

- Input: each frame resized (bilinear) so that its short side is `short_side` (480) and its
  long side the multiple of 64 at or below short_side × aspect ratio (DINO's rule: 854 × 480
  becomes 832 × 480); where the patch does not divide a side (ViT-H/14) that side is then
  rounded to the nearest multiple of the patch (832 × 480 becomes 826 × 476). Normalised with
  DINO's statistics.
- Features: the last block's tokens through the encoder's closing norm, L2-normalised, with
  the fixed sine-cosine positions generated for the frame's own (non-square) grid.
- Context of frame t: the first frame, with its true mask, and the `n_last_frames` frames
  before t, with their soft predictions.
- Affinity of a patch q of frame t to a context patch k: exp(cos(q, k) / temperature), zero
  where k lies more than `radius` patches from q in rows or columns; per q only the `topk`
  largest over all context patches are kept, normalised to sum to 1, and q's labels (a score
  per object and for the background) are the so-weighted sum of theirs.
- Output: the labels upsampled bilinearly by the patch size, each object's channel min-max
  normalised, the arg-max taken and resized (nearest) to the frame's size. The first frame's
  mask enters on the patch grid, resized nearest.
"""

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stoptool.data.datasets import read_rgb
from stoptool.data.prepare import available_cpus
from stoptool.errors import UserError
from stoptool.flops import block_flops
from stoptool.models.archs import parse_arch
from stoptool.models.pos_embed import sincos_2d

# DINO's evaluation normalises with these; its red standard deviation is 0.228, where the
# ImageNet statistics used for pretraining have 0.229.
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)
LONG_SIDE_MULTIPLE = 64


def input_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """(height, width) the encoder reads a height × width frame at (see the module's notes)."""
    scaled = short_side * max(height, width) / min(height, width)
    long_side = int(scaled // LONG_SIDE_MULTIPLE) * LONG_SIDE_MULTIPLE
    if long_side == 0:
        raise UserError(f"short_side {short_side} is too small: the long side of a {width}×{height} frame "
                        f"would be under {LONG_SIDE_MULTIPLE} px, and DINO's rule rounds it down to a "
                        f"multiple of {LONG_SIDE_MULTIPLE}", key="short_side")
    h, w = (long_side, short_side) if height > width else (short_side, long_side)
    return _to_patches(h, patch), _to_patches(w, patch)


def _to_patches(side: int, patch: int) -> int:
    """`side` rounded to the nearest multiple of `patch` (halves up), at least one patch."""
    return max(patch, (side + patch // 2) // patch * patch)


def check_sincos(encoder: torch.nn.Module) -> None:
    """The encoder's positions are the fixed sine-cosine table (what lets them be generated for
    any grid); a table of learned positions could not be carried to DAVIS's grid."""
    table = encoder.pos_embed.detach().float().cpu()[0]
    grid = int(round(table.shape[0] ** 0.5))
    if grid * grid != table.shape[0] or not torch.allclose(table, sincos_2d(table.shape[1], grid), atol=1e-4):
        raise UserError("the encoder's positional embeddings are not the fixed 2-D sine-cosine table on a "
                        "square grid: they cannot be generated for a video frame's grid")


def grid_features(encoder: torch.nn.Module, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The last block's normed tokens [B, h·w, D] of images [B, 3, h·p, w·p], with `positions`
    [h·w, D] the sine-cosine table of that grid (`stoptool.models.encoder.encode`, without the
    square grid its image size fixes)."""
    x = encoder.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = encoder.patch_embed.norm(x) + positions
    return encoder.norm(encoder.blocks(x))


def read_frames(paths: list[Path], threads: int | None = None) -> Iterator[torch.Tensor]:
    """The frames as uint8 tensors [3, H, W], in order, decoded by a few threads (JPEG decoding
    leaves Python's lock)."""
    def read(path: Path) -> torch.Tensor:
        try:
            return torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read frame '{path}': {str(err).splitlines()[0][:120]}") from None

    with ThreadPoolExecutor(threads or min(8, available_cpus())) as pool:
        yield from pool.map(read, paths)


def extract(encoder: torch.nn.Module, paths: list[Path], size: tuple[int, int], device: torch.device,
            autocast: Callable, batch_size: int, done: Callable[[int], None] | None = None) -> torch.Tensor:
    """L2-normalised patch features [T, h·w, D] (float32, on `device`) of the frames at `paths`,
    resized to `size`, in batches of `batch_size`; `done(n)` after each batch of n frames."""
    patch = encoder.patch_embed.proj.kernel_size[0]
    grid = (size[0] // patch, size[1] // patch)
    positions = sincos_2d(encoder.embed_dim, *grid).to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    out, batch = [], []

    def run() -> None:
        x = torch.stack(batch).to(device, non_blocking=True).float()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = (x / 255 - mean) / std
        with autocast():
            feats = grid_features(encoder, x, positions)
        out.append(F.normalize(feats.float(), dim=-1))
        if done:
            done(len(batch))
        batch.clear()

    for frame in read_frames(paths):
        batch.append(frame)
        if len(batch) == batch_size:
            run()
    if batch:
        run()
    return torch.cat(out)


def first_labels(ids: np.ndarray, objects: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The first frame's mask on the patch grid (nearest), one-hot: [h·w, objects + 1]. Void
    pixels (255) that land on the grid get no label at all: they vote for nothing."""
    small = F.interpolate(torch.from_numpy(ids)[None, None].float(), size=grid, mode="nearest-exact")
    small = small.reshape(-1).long().to(device)
    labels = torch.zeros(small.numel(), objects + 1, device=device)
    known = small <= objects
    labels[known] = F.one_hot(small[known], objects + 1).float()
    return labels


def neighbourhood(grid: tuple[int, int], radius: int, device: torch.device) -> torch.Tensor:
    """[h·w, h·w] bool: True where two patches lie within `radius` of each other in rows and
    in columns (a square window)."""
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    return near_rows & ((cols[:, None] - cols[None, :]).abs() <= radius)


def propagate(features: torch.Tensor, first: torch.Tensor, grid: tuple[int, int], n_last_frames: int,
              topk: int, radius: int, temperature: float) -> Iterator[torch.Tensor]:
    """The soft labels [h·w, K] of frames 1, 2, ... in turn, from `features` [T, h·w, D]
    (L2-normalised) and the first frame's labels `first` [h·w, K]. `radius` 0: no window.

    The kept affinities are normalised as a softmax over their logits cos / temperature: the
    same numbers as exp(·) divided by their sum, without overflow at small temperatures."""
    near = neighbourhood(grid, radius, features.device) if radius > 0 else None
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    for t in range(1, features.shape[0]):
        keys = torch.stack([features[0], *(f for f, _ in queue)])  # [C, N, D]
        values = torch.cat([first, *(labels for _, labels in queue)])  # [C·N, K]
        logits = torch.einsum("qd,cnd->qcn", features[t], keys) / temperature  # [N, C, N]
        if near is not None:
            logits = logits.masked_fill(~near[:, None, :], float("-inf"))
        logits = logits.flatten(1)  # each patch of frame t against every context patch
        kth = logits.topk(min(topk, logits.shape[1]), dim=1).values[:, -1:]
        weights = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=1)
        labels = weights @ values
        queue.append((features[t], labels))
        yield labels


def to_ids(labels: torch.Tensor, grid: tuple[int, int], patch: int, frame: tuple[int, int]) -> np.ndarray:
    """Soft labels [h·w, K] -> object ids [H, W] uint8 at the frame's size."""
    scores = labels.T.reshape(1, -1, *grid)
    scores = F.interpolate(scores, size=(grid[0] * patch, grid[1] * patch), mode="bilinear",
                           align_corners=False)[0]
    low = scores.amin(dim=(1, 2), keepdim=True)
    high = scores.amax(dim=(1, 2), keepdim=True)
    # each channel onto [0, 1]; as in DINO, one that is 0 everywhere stays so (and a constant
    # positive one becomes 0 here, where DINO's division gives 0/0)
    scores = torch.where(high > 0, (scores - low) / (high - low).clamp_min(1e-12), scores)
    ids = scores.argmax(0)[None, None].float()
    ids = F.interpolate(ids, size=frame, mode="nearest-exact")[0, 0]
    return ids.to(torch.uint8).cpu().numpy()


def frame_flops(arch: str, size: tuple[int, int]) -> int:
    """Forward FLOPs of the encoder on one frame of `size` (see `stoptool.flops`)."""
    spec, patch = parse_arch(arch)
    tokens = (size[0] // patch) * (size[1] // patch)
    embed = 2 * tokens * (3 * patch * patch) * spec.width
    return embed + spec.depth * block_flops(tokens, spec.width, spec.mlp_ratio)


def propagation_flops(arch: str, size: tuple[int, int], context: int, labels: int) -> int:
    """FLOPs of propagating to one frame: the affinities to `context` frames and the weighted
    sum of their `labels` scores (the top-k, softmax and resizing are not counted)."""
    spec, patch = parse_arch(arch)
    tokens = (size[0] // patch) * (size[1] // patch)
    return 2 * context * tokens * tokens * (spec.width + labels)
