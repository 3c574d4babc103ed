"""The options of the `stoptool viz` figures, declared once (see `stoptool.options`). A light
module: reading it loads neither matplotlib nor timm."""

from dataclasses import dataclass

from stoptool.options import option

SEED_MAX = 2**32 - 1  # what numpy and scikit-learn take
IMAGE_HELP = "An image; its central square is used."
IMAGE_DEFAULT = "the sample photo shipped with stoptool"
OUT_HELP = "Figure file; .png, .svg or .pdf (the numbers go to the same name with .json)."


def _out(anchor: str, name: str) -> object:
    return option(None, OUT_HELP, default_text=f"figures/{name}.png beside the {anchor}")


def _dpi() -> object:
    return option(150, "Resolution of raster output, in dots per inch.")


@dataclass
class SimilarityOptions:
    ckpts: list[str] = option(
        None, "One or more stoptool checkpoints with a predictor (.safetensors), or run directories (their "
        "latest); e.g. an I-JEPA and a StoP checkpoint.", argument=True, required=True, metavar="CKPT")
    sigma: float | None = option(
        None, "Noise standard deviation σ of the stochastic maps.",
        default_text="each checkpoint's σ; for one checkpoint trained with σ = 0, 0.25")
    draws: int = option(256, "Noise draws n averaged per query (1 to 1,000,000).")
    queries: str | None = option(None, "Query patches: N for an N×N spread over the grid, or "
                                 "ROW,COL;ROW,COL;...", default_text="3")
    seed: int = option(0, "Seed of the noise draws.", low=0, high=SEED_MAX)
    out: str | None = option(None, OUT_HELP, default_text="figures/similarity.png beside the checkpoint; "
                             "figures/similarity-compare.png beside the first of several")
    dpi: int = _dpi()


@dataclass
class HeatmapOptions:
    ckpt: str = option(None, "A stoptool checkpoint with a predictor (.safetensors), or a run directory (its "
                       "latest).", argument=True, required=True)
    image: str | None = option(None, IMAGE_HELP, argument=True, default_text=IMAGE_DEFAULT)
    patch: str | None = option(None, "Masked patch(es) to explain, ROW,COL;ROW,COL;... each inside a target "
                               "block.", default_text="the centre of each target block")
    seed: int = option(0, "Seed of the sampled mask (the checkpoint's mask settings).", low=0, high=SEED_MAX)
    temperature: float = option(0.1, "Softmax temperature τ over the cosine similarities.")
    out: str | None = _out("checkpoint", "heatmap")
    dpi: int = _dpi()


@dataclass
class MasksOptions:
    """The figure's own options; the mask settings are `masks.MaskConfig`'s."""

    image: str | None = option(None, IMAGE_HELP, argument=True, default_text=IMAGE_DEFAULT)
    seeds: str = option("0,1,2,3", "Comma-separated seeds, one panel each.")
    config: str | None = option(None, "Mask and size settings from a preset name or a YAML file (a run's "
                                "config.yaml works); flags override it.", default_text="pretrain's defaults")
    img_size: int | None = option(None, "Image side in pixels.", default_text="from --config, else 32")
    patch: int | None = option(None, "Patch size in pixels.",
                               default_text="the patch of the config's arch, else 4")
    out: str = option("masks.png", OUT_HELP)
    dpi: int = _dpi()

    def seed_list(self) -> list[int]:
        """The seeds, parsed and checked."""
        from stoptool.errors import UserError

        try:
            seeds = [int(s) for s in self.seeds.replace(" ", "").split(",") if s]
        except ValueError:
            raise UserError(f"seeds takes integers separated by commas, got '{self.seeds}'",
                            key="seeds") from None
        if any(not 0 <= s <= SEED_MAX for s in seeds):
            raise UserError(f"seeds must each be between 0 and {SEED_MAX}, got '{self.seeds}'", key="seeds")
        return seeds


@dataclass
class CurvesOptions:
    run_dirs: list[str] = option(None, "One or more run directories written by stoptool pretrain.",
                                 argument=True, required=True, metavar="RUN_DIR")
    out: str | None = _out("first run", "curves")
    dpi: int = _dpi()


@dataclass
class TrackFigureOptions:
    run_or_dir: str = option(None, "What stoptool track wrote (OUT, holding SEQ/00000.png ...), or the run "
                             "directory it wrote beside (its newest *.davis-* folder).", argument=True,
                             required=True, metavar="RUN_OR_DIR")
    seq: str = option(None, "The sequence to draw, e.g. bike-packing.", argument=True, required=True,
                      metavar="SEQ")
    davis: str | None = option(None, "The DAVIS 2017 folder.", metavar="PATH",
                               default_text="the one recorded in the folder's results JSON")
    frames: int = option(5, "Frames shown, spread evenly from the first to the last (2 to 12).", low=2,
                         high=12)
    gif: str | None = option(None, "Also write every frame, prediction beside ground truth, as an animated "
                             "GIF.", metavar="FILE")
    out: str | None = option(None, OUT_HELP, default_text="figures/track-SEQ.png in the folder")
    dpi: int = _dpi()
