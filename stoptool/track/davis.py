"""DAVIS 2017 as released, and object masks read and written in its layout.

The release (DAVIS-2017-trainval-480p.zip) unpacks to

    DAVIS/JPEGImages/480p/SEQ/00000.jpg, 00001.jpg, ...
    DAVIS/Annotations/480p/SEQ/00000.png, ...   palette PNGs: a pixel's index is its object id
                                                (0 background, 1..N objects, 255 void)
    DAVIS/ImageSets/2017/train.txt, val.txt     one sequence name a line

Predictions go the same way, DIR/SEQ/00000.png ..., which is what the official evaluation
reads. Everything a run needs from the release is checked here, before anything is written.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stoptool.errors import UserError, plural
from stoptool.io.paths import atomic_write

DOWNLOAD = "https://davischallenge.org/davis2017/code.html"
RESOLUTION = "480p"
VOID = 255


def palette() -> np.ndarray:
    """The colours DAVIS's masks use (PASCAL VOC's map): the bits of an id, lowest first, are
    dealt to red, green and blue in turn, from each channel's top bit down. [256, 3] uint8."""
    ids = np.arange(256)
    rgb = np.zeros((256, 3), dtype=np.uint8)
    for level in range(8):
        for channel in range(3):
            bit = (ids >> (3 * level + channel)) & 1
            rgb[:, channel] |= (bit << (7 - level)).astype(np.uint8)
    return rgb


@dataclass
class Sequence:
    """One video: its frames and its ground truth (every frame's, or the first frame's alone,
    as in the test-dev release)."""

    name: str
    frames: list[Path]
    annotations: list[Path]
    size: tuple[int, int]  # (height, width) of every frame and mask
    objects: int  # the first annotation's highest object id

    @property
    def scored(self) -> bool:
        """Whether the ground truth covers every frame (else it is propagated, not scored)."""
        return len(self.annotations) == len(self.frames)


def read_ids(path: Path) -> np.ndarray:
    """The object ids of a mask PNG (its palette indices, or its grey levels), [H, W] uint8."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise UserError(f"'{path}' is a {img.mode} image, not a palette PNG of object ids (as "
                                "DAVIS's Annotations are)")
            return np.array(img)
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read mask '{path}': {str(err).splitlines()[0][:120]}") from None


def write_ids(path: Path, ids: np.ndarray) -> Path:
    """Write object ids as a palette PNG in DAVIS's colours, atomically."""
    img = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    img.putpalette(palette().reshape(-1).tolist())  # (an 8-bit grey image becomes a palette one)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read '{path}': {str(err).splitlines()[0][:120]}") from None


def open_davis(root: str | Path, split: str, only: list[str] | None = None) -> list[Sequence]:
    """The sequences of `split` (ImageSets/2017/SPLIT.txt), or those of them named in `only`,
    each checked: frames present, the first frame's annotation present and holding an object,
    one annotation per frame or the first alone, one size throughout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"DAVIS folder '{root}' {state}: unpack DAVIS-2017-trainval-480p.zip (from "
                        f"{DOWNLOAD}) and give the folder holding JPEGImages/, Annotations/ and ImageSets/",
                        key="davis")
    names = split_names(root, split)
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"sequence '{unknown[0]}' is not in ImageSets/2017/{split}.txt", key="sequence")
        names = [n for n in names if n in only]
    return [open_sequence(root, name) for name in names]


def split_names(root: Path, split: str) -> list[str]:
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        known = sorted(p.stem for p in (root / "ImageSets" / "2017").glob("*.txt"))
        have = f" (it has: {', '.join(known)})" if known else ""
        raise UserError(f"'{root}' has no ImageSets/2017/{split}.txt{have}: is it the DAVIS 2017 folder?",
                        key="split")
    names = list(dict.fromkeys(line.strip() for line in listing.read_text().splitlines() if line.strip()))
    if not names:
        raise UserError(f"'{listing}' lists no sequence", key="split")
    return names


def open_sequence(root: Path, name: str) -> Sequence:
    frame_dir = root / "JPEGImages" / RESOLUTION / name
    mask_dir = root / "Annotations" / RESOLUTION / name
    frames = sorted(frame_dir.glob("*.jpg"))
    if not frames:
        raise UserError(f"sequence '{name}': no frames in '{frame_dir}' "
                        f"(JPEGImages/{RESOLUTION}/{name}/*.jpg)")
    annotations = sorted(mask_dir.glob("*.png"))
    first = mask_dir / f"{frames[0].stem}.png"
    if not first.is_file():
        raise UserError(f"sequence '{name}': the first frame's annotation '{first}' is missing: propagation "
                        "starts from it")
    if len(annotations) > 1 and [a.stem for a in annotations] != [f.stem for f in frames]:
        raise UserError(f"sequence '{name}': {plural(len(frames), 'frame')} in '{frame_dir}' but "
                        f"{plural(len(annotations), 'annotation')} in '{mask_dir}' that do not match them "
                        "one to one: scoring needs a mask per frame (or give the first alone, as test-dev "
                        "does)")
    annotations = annotations if len(annotations) > 1 else [first]
    size = image_size(frames[0])
    _check_sizes(name, [*frames, *annotations], size)
    ids = read_ids(first)
    objects = int(ids[ids != VOID].max(initial=0))
    if objects == 0:
        raise UserError(f"sequence '{name}': the first annotation '{first}' holds no object (every pixel 0 "
                        "or 255)")
    seq = Sequence(name, frames, annotations, size, objects)
    if seq.scored and len(frames) < 3:
        raise UserError(f"sequence '{name}' has {plural(len(frames), 'frame')}: the DAVIS score leaves out "
                        "the first and the last, so a scored sequence needs at least 3")
    return seq


def _check_sizes(name: str, paths: list[Path], size: tuple[int, int]) -> None:
    for path in paths:
        other = image_size(path)
        if other != size:
            raise UserError(f"sequence '{name}': '{path}' is {other[1]}×{other[0]}, its first frame "
                            f"{size[1]}×{size[0]}: a sequence's frames and masks have one size")


def prediction_paths(pred_dir: Path, seq: Sequence) -> list[Path]:
    """The predicted masks the score reads: PRED_DIR/SEQ/<frame>.png for every frame but the
    first and the last, as the official evaluation reads them."""
    wanted = [pred_dir / seq.name / f"{a.stem}.png" for a in seq.annotations[1:-1]]
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        raise UserError(f"'{missing[0]}' is missing ({plural(len(missing), 'predicted mask')} of "
                        f"{len(wanted)} that '{seq.name}' needs): one palette PNG per frame, named as its "
                        "annotation")
    return wanted


def read_prediction(path: Path, seq: Sequence) -> np.ndarray:
    """A predicted mask, checked against its sequence: same size, no object id above the first
    frame's (the official evaluation stops there too)."""
    ids = read_ids(path)
    if ids.shape != seq.size:
        raise UserError(f"'{path}' is {ids.shape[1]}×{ids.shape[0]}, the frames of '{seq.name}' "
                        f"{seq.size[1]}×{seq.size[0]}")
    top = int(ids.max())
    if top > seq.objects:
        raise UserError(f"'{path}' holds object id {top}, above the {plural(seq.objects, 'object')} of the "
                        f"first frame of '{seq.name}'")
    return ids
