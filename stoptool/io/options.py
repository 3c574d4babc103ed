"""The options of `stoptool info`, `import` and `export`, declared once (see
`stoptool.options`). A light module: reading it loads none of the heavy readers and writers."""

from dataclasses import dataclass
from typing import Literal

from stoptool.options import option

Which = Literal["target", "context"]


@dataclass
class InfoOptions:
    ckpt: str = option(None, "A stoptool checkpoint (.safetensors), a run directory (its latest), or a model "
                       "folder written by export --to hf|transformers.", argument=True, required=True)
    json: bool = option(False, "Print the metadata as JSON.", flags=("--json",))


@dataclass
class ImportOptions:
    src: str = option(None, "An official I-JEPA / StoP checkpoint (.pth.tar); encoder weights with timm's or "
                      "transformers' IJepaModel names (.pth, .bin, .safetensors); or a timm / transformers "
                      "model folder (export --to hf|transformers writes them).", argument=True, required=True)
    out: str = option(None, "The stoptool checkpoint to write (.safetensors).", argument=True, required=True)
    arch: str | None = option(None, "Encoder arch, e.g. vit_h14.",
                              default_text="inferred from the tensor shapes")
    kind: Literal["stop", "ijepa"] | None = option(
        None, "stop | ijepa: how the predictor was trained; sets m̃ to b (StoP) or mask_token (I-JEPA).",
        default_text="read from the optimizer state or the file name")
    sigma: float | None = option(None, "StoP noise standard deviation σ to record.", low=0,
                                 default_text="0.25 for StoP, 0.2 for StoP ViT-H, 0 for I-JEPA")


@dataclass
class ExportOptions:
    ckpt: str = option(None, "A stoptool checkpoint (.safetensors), or a run directory (its latest).",
                       argument=True, required=True)
    out: str = option(None, "What to write: a .safetensors file (--to timm), or a folder (--to hf, --to "
                      "transformers).", argument=True, required=True)
    to: Literal["timm", "hf", "transformers"] = option(
        "timm", "timm: one safetensors file for timm.create_model | hf: a Hugging Face Hub folder for timm "
        "(config.json, model.safetensors, README.md model card) that timm.create_model('local-dir:OUT') "
        "loads, and 'hf-hub:ORG/NAME' once uploaded | transformers: a transformers IJepaModel folder with a "
        "model card (needs transformers, which stoptool's hf extra installs).")
    which: Which = option("target", "Which encoder: target (the EMA one the paper evaluates) | context.")
    license: str | None = option(None, "Hub license id for the model card of a folder, e.g. mit, apache-2.0, "
                                 "cc-by-nc-4.0.", default_text="none stated")
    force: bool = option(False, "Write the folder into one that is not empty: its config.json, "
                         "model.safetensors and README.md are replaced, other files (a clone's .git) stay.",
                         flags=("--force",))
    push: str | None = option(None, "Upload the folder to this Hugging Face Hub model repository, created if "
                              "missing (needs huggingface_hub and a login: hf auth login).",
                              metavar="ORG/NAME")
