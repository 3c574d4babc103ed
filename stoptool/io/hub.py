"""Publish an encoder as a Hugging Face Hub model folder (`stoptool export --to hf|transformers`).

* `hf`: a timm folder. `config.json` in timm's format (`architecture`, `num_classes`,
  `num_features`, `global_pool`, `model_args`, `pretrained_cfg`), so that
  `timm.create_model("local-dir:DIR", pretrained=True)`, and `"hf-hub:ORG/NAME"` once uploaded,
  builds the encoder and loads `model.safetensors` into it strictly. That file is the one
  `--to timm` writes, so every stoptool command reads it too.
* `transformers`: transformers' `IJepaModel` layout (`config.json` with `model_type: ijepa`,
  the weights under the names of its files, `io/folders.py`). Needs transformers: before
  writing, the installed version loads a one-block copy and must give timm's features.

A fine-tuned classifier (`stoptool finetune`) goes to `hf` whole, encoder and linear head
(`num_classes` and the class names in `config.json`), so timm gives its logits; to
`transformers`, whose `IJepaModel` has no head, as its encoder alone.

Both get a `README.md` model card: what the model is, how it was trained (from the
checkpoint's metadata), the probe results written beside the checkpoint for this very encoder,
how to load it, and the citation. The folder is filled beside its destination and moved into
place at the end; `--push ORG/NAME` then uploads it with huggingface_hub.
"""

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stoptool.data.transforms import CROP_PCT, MEAN, STD
from stoptool.errors import UserError
from stoptool.io.checkpoint import (
    TIMM_CLASSIFIER,
    TIMM_ENCODER,
    Checkpoint,
    atomic_save_file,
    resolve_checkpoint,
    save_checkpoint,
    tensors_digest,
)
from stoptool.io.export import check_which, read_encoder, timm_model_args
from stoptool.io.folders import CARD, CONFIG, FILES, WEIGHTS, timm_to_ijepa
from stoptool.io.official import PUBLISHED
from stoptool.io.paths import check_writable, write_report, write_text_atomic
from stoptool.models.archs import parse_arch
from stoptool.models.encoder import encode, timm_kwargs

TARGETS = ("hf", "transformers")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's license ids: mit, apache-2.0, cc-by-nc-4.0, other
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
PAPERS = {
    "stop": ("Stochastic positional embeddings improve masked image modeling", "arXiv:2308.00566"),
    "ijepa": ("Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture",
              "arXiv:2301.08243"),
}


@dataclass
class Published:
    out: Path
    to: str
    facts: dict[str, Any]  # which, source, arch, img_size, σ, step, ...
    params: int
    load: str  # the Python that loads the folder
    report: Path
    probes: int  # probe results in the model card
    notes: list[str] = field(default_factory=list)
    url: str | None = None  # where --push put it

    def rows(self) -> dict[str, Any]:
        """The table `stoptool export --to hf|transformers` prints."""
        f = self.facts
        rows = {"folder": self.out, "layout": "timm (local-dir / hf-hub)" if self.to == "hf"
                else "transformers IJepaModel", "encoder": f["which"], "arch": f["arch"],
                "img_size": f["img_size"], "params": f"{self.params:,}", "probe results": self.probes,
                "report": self.report}
        if self.url:
            rows["uploaded to"] = self.url
        return rows


def folder_report_path(out: Path) -> Path:
    """`<folder>.export.json` beside the folder: not inside, where it would be uploaded."""
    return out.with_name(f"{out.name}.export.json")


def check_request(to: str, which: str, license: str | None, push: str | None) -> None:
    """The options, and the packages they need, before anything is read or written."""
    if to not in TARGETS:
        raise UserError(f"a hub folder is one of {', '.join(TARGETS)}, got '{to}'", key="to")
    check_which(which)
    if license is not None and not _LICENSE.fullmatch(license):
        raise UserError(f"license must be a Hub license id such as mit, apache-2.0 or cc-by-nc-4.0, "
                        f"got '{license}'", key="license")
    if push is not None and (not _REPO.fullmatch(push) or ".." in push or "--" in push):
        raise UserError(f"push takes a Hub repository as ORG/NAME, got '{push}'", key="push")
    if to == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            # the words, not 'stoptool[hf]': the command line prints messages as rich markup
            raise UserError("exporting to transformers needs the transformers package: "
                            "pip install 'stoptool[hf]'", key="to") from None
    if push is not None:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise UserError("push needs the huggingface_hub package: pip install 'stoptool[hf]'",
                            key="push") from None


def check_folder_out(out: Path, force: bool) -> None:
    """`out` is a new or empty folder, or (force) one whose files of our names may be replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a folder; give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"'{out}' exists and is not empty; give a new folder, or force to write "
                            f"{', '.join(FILES)} over the ones there", key="force")
        clash = [n for n in FILES if (out / n).is_dir()]
        if clash:
            raise UserError(f"'{out / clash[0]}' is a folder; the export writes a file by that name")
        check_writable(out / CONFIG)
    check_writable(out, beside=(folder_report_path(out).name,))
    if folder_report_path(out).is_dir():
        raise UserError(f"'{folder_report_path(out)}' (the JSON report beside '{out}') is a folder")


def export_folder(ckpt_path: str | Path, out: str | Path, to: str = "hf", which: str = "target",
                  license: str | None = None, force: bool = False, push: str | None = None) -> Published:
    """Write the `which` encoder of `ckpt_path` as the hub folder `out` (`to`: hf or transformers)."""
    given, out = Path(ckpt_path), Path(out)
    ckpt_path = resolve_checkpoint(given)
    check_request(to, which, license, push)
    check_folder_out(out, force)
    tensors, facts, meta = read_encoder(ckpt_path, which)
    notes = []
    if to == "transformers" and "head.weight" in tensors:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        facts = {k: v for k, v in facts.items() if k not in ("num_classes", "classes")}
        notes.append("transformers' IJepaModel has no classification head: the folder holds the fine-tuned "
                     "encoder alone (--to hf keeps the head)")
    probes, found = probe_results([given, ckpt_path], tensors_digest(tensors))
    notes += found
    params = sum(t.numel() for t in tensors.values())
    card = model_card(to, facts, meta, params, probes, push or "ORG/NAME", license)

    def fill(tmp: Path) -> None:
        if to == "hf":
            write_timm_folder(tmp, tensors, facts, license)
        else:
            write_transformers_folder(tmp, tensors, facts)
        (tmp / CARD).write_text(card)

    fill_folder(out, fill)
    where = out.resolve()
    load = (f"import timm; model = timm.create_model({f'local-dir:{where}'!r}, pretrained=True)" if to == "hf"
            else f"from transformers import IJepaModel; model = IJepaModel.from_pretrained({str(where)!r})")
    report = write_report(folder_report_path(out), {
        "folder": str(out), "to": to, "checkpoint": str(ckpt_path), **facts, "params": params,
        "license": license, "probe_results": len(probes), "load": load, "push": push,
    })
    url = push_folder(out, push) if push else None
    return Published(out, to, facts, params, load, report, len(probes), notes, url)


def fill_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(tmp)` on a new folder beside `out`, then move it into place: `out` ends up
    whole or as it was. A missing or empty `out` is replaced by the folder; into one that holds
    other files (a clone of the Hub repository, with its .git), our files are moved one by one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    short = os.fsencode(out.name)[:64].decode(errors="ignore")
    tmp = Path(tempfile.mkdtemp(prefix=f".{short}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; a plain mkdir's is not
        if out.is_dir() and any(out.iterdir()):
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the two layouts -----------------------------------------------------------------------


def method_of(facts: dict[str, Any]) -> str | None:
    """stop or ijepa: as recorded (an import), else from σ (0 is I-JEPA); None if neither says."""
    if facts.get("method") in PAPERS:
        return facts["method"]
    sigma = facts.get("sigma")
    return None if sigma is None else ("stop" if sigma > 0 else "ijepa")


def timm_config(facts: dict[str, Any], license: str | None = None) -> dict[str, Any]:
    """`config.json` for `timm.create_model("local-dir:...")`: a registered ViT made this encoder
    by `model_args`, and the evaluation preprocessing in `pretrained_cfg`."""
    arch, img, classes = facts["arch"], facts["img_size"], facts.get("num_classes", 0)
    name, _ = timm_model_args(arch, img)
    args = {k: v for k, v in timm_kwargs(arch, img).items() if k not in ("norm_layer", "num_classes")}
    pretrained_cfg: dict[str, Any] = {
        "custom_load": False, "input_size": [3, img, img], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": CROP_PCT, "crop_mode": "center",
        "mean": list(MEAN), "std": list(STD), "num_classes": classes,
        "first_conv": "patch_embed.proj", "classifier": "head",
    }
    if facts.get("classes"):
        pretrained_cfg["label_names"] = list(facts["classes"])
    method = method_of(facts)
    if method:
        pretrained_cfg["paper_name"], pretrained_cfg["paper_ids"] = PAPERS[method]
    if license:
        pretrained_cfg["license"] = license
    return {"architecture": name, "num_classes": classes, "num_features": args["embed_dim"],
            "global_pool": "avg", "model_args": args, "pretrained_cfg": pretrained_cfg}


def write_timm_folder(tmp: Path, tensors: dict[str, torch.Tensor], facts: dict[str, Any],
                      license: str | None) -> None:
    name, kwargs = timm_model_args(facts["arch"], facts["img_size"], facts.get("num_classes", 0))
    kind = TIMM_CLASSIFIER if "head.weight" in tensors else TIMM_ENCODER
    meta = {"kind": kind, **facts, "timm_model": name, "timm_kwargs": kwargs}
    save_checkpoint(tmp / WEIGHTS, Checkpoint(meta, tensors))  # what --to timm writes
    write_text_atomic(tmp / CONFIG, json.dumps(timm_config(facts, license), indent=2) + "\n")


def ijepa_config(facts: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """transformers' `IJepaConfig` of this encoder (LayerNorm eps 1e-6, exact GELU, qkv bias)."""
    from transformers import IJepaConfig

    spec, patch = parse_arch(facts["arch"])
    return IJepaConfig(
        hidden_size=spec.width, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
        intermediate_size=tensors["blocks.0.mlp.fc1.weight"].shape[0],  # timm's int(width * ratio)
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=facts["img_size"], patch_size=patch,
        num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        architectures=["IJepaModel"],
    )


def write_transformers_folder(tmp: Path, tensors: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
    check_transformers_reads(tensors, facts)
    ijepa_config(facts, tensors).save_pretrained(str(tmp))
    # transformers reads only safetensors files marked format "pt"; the facts ride beside it
    atomic_save_file(timm_to_ijepa(tensors), tmp / WEIGHTS, {"format": "pt", "stoptool": json.dumps(facts)})


def check_transformers_reads(tensors: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
    """The installed transformers loads a one-block copy of the folder with no key missing,
    unexpected or misshapen, and gives timm's tokens. A version that named or split the weights
    otherwise would load ours as random layers, or compute something else: refused here, for
    any size, at the cost of one block."""
    import transformers
    from timm.models.vision_transformer import VisionTransformer

    arch, img = facts["arch"], facts["img_size"]
    one = {k: v for k, v in tensors.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    config = ijepa_config(facts, tensors)
    config.num_hidden_layers = 1
    logs, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its notes and bars on loading: the check says more
    transformers.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as d:
            config.save_pretrained(d)
            save_file(timm_to_ijepa(one), str(Path(d) / WEIGHTS), metadata={"format": "pt"})
            model, info = transformers.IJepaModel.from_pretrained(d, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(logs)
        if bars:
            transformers.logging.enable_progress_bar()
    problems = "; ".join(f"{k.replace('_', ' ')}: {', '.join(str(x) for x in list(info[k])[:4])}"
                         for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k))
    reference = VisionTransformer(**{**timm_kwargs(arch, img), "depth": 1})
    reference.load_state_dict(one)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encode(reference.eval(), x)
        theirs = model.eval().float()(pixel_values=x).last_hidden_state if not problems else ours
    err = float((theirs - ours).norm() / ours.norm())
    if problems or not err < 1e-5:  # the bar the export promises (fp32); one block is far inside it
        found = problems or f"its features differ from timm's by {err:.1e}"
        raise UserError(f"transformers {transformers.__version__} does not read IJepaModel weights as "
                        f"stoptool writes them ({found}); try another transformers version, or --to hf")


# -- the model card ------------------------------------------------------------------------


def probe_results(checkpoints: list[Path], digest: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the `<stem>.probe-*.json` files beside the checkpoint (as given, and a run
    directory's latest) that probed this very encoder: the file's `encoder_sha256` is the
    digest of its tensors. Results of another encoder (an earlier `latest`, the other one of
    the pair, another image size) stay out of the card, with a note."""
    rows, notes, seen = [], [], set()
    for ckpt in checkpoints:
        for f in sorted(ckpt.parent.glob(f"{glob.escape(ckpt.stem)}.probe-*.json")):
            if f in seen:
                continue
            seen.add(f)
            try:
                data = json.loads(f.read_text())
                results = data["results"] if data.get("encoder_sha256") == digest else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                notes.append(f"{f.name} is not a probe result file; left out of the model card")
                continue
            if results is None:
                notes.append(f"{f.name} holds results of another encoder (or image size); "
                             "left out of the model card")
                continue
            rows += [{"dataset": data.get("dataset", "?"), **r} for r in results if isinstance(r, dict)]
    return rows, notes


def _arch_name(arch: str) -> str:
    return f"ViT-{arch[len('vit_')].upper()}/{parse_arch(arch)[1]}"


def _data_text(facts: dict[str, Any], meta: dict[str, Any]) -> str:
    data = facts.get("data")
    if isinstance(data, dict) and data.get("name"):
        extra = [f"{data['size']:,} images" if isinstance(data.get("size"), int) else "",
                 f"{data['classes']} classes" if isinstance(data.get("classes"), int) else ""]
        extra = [e for e in extra if e]
        name = str(data["name"])
        if "/" in name or os.sep in name:  # an image folder: its path is the user's, not the card's
            name = f"the image folder `{'/'.join(Path(name).parts[-2:])}`"
        return name + (f" ({', '.join(extra)})" if extra else "")
    if meta.get("source") in PUBLISHED:  # an imported official checkpoint
        return "ImageNet-22K" if meta["source"].startswith("IN22K") else "ImageNet-1K"
    return "not recorded in the checkpoint"


METHOD_NAMES = {"stop": "StoP on I-JEPA", "ijepa": "I-JEPA", None: "not recorded"}


def _what_text(facts: dict[str, Any]) -> tuple[str, str]:
    method, sigma = method_of(facts), facts.get("sigma")
    if method == "stop":
        how = (f"**StoP** (stochastic positional embeddings, Bar et al., ICML 2024) on I-JEPA, with "
               f"σ = {sigma if sigma is not None else 'not recorded'} (the standard deviation of the "
               "noise on the masked tokens' positions)")
    elif method == "ijepa":
        how = "**I-JEPA** (Assran et al., CVPR 2023), with deterministic sine-cosine positions (σ = 0)"
    else:
        how = "I-JEPA or StoP (the checkpoint does not record which)"
    which = ("the **target encoder** (the EMA copy of the context encoder, the one the papers evaluate)"
             if facts["which"] == "target" else "the **context encoder**")
    return how, which


def _training_rows(facts: dict[str, Any], meta: dict[str, Any], params: int) -> list[tuple[str, str]]:
    spec, patch = parse_arch(facts["arch"])
    img, grid = facts["img_size"], facts["img_size"] // patch
    rows = [("method", METHOD_NAMES[method_of(facts)]),
            ("σ", str(facts["sigma"]) if "sigma" in facts else "not recorded"),
            ("architecture", f"{facts['arch']}: width {spec.width}, depth {spec.depth}, {spec.heads} heads, "
                             f"patch {patch}, no class token"),
            ("image size", f"{img} × {img} px ({grid} × {grid} patches)"),
            ("data", _data_text(facts, meta))]
    if "step" in facts:
        rows.append(("steps", f"{facts['step']:,}"))
    if "epoch" in facts:
        planned = meta.get("config", {}).get("epochs") if isinstance(meta.get("config"), dict) else None
        rows.append(("epochs", f"{facts['epoch']}" + (f" of {planned}" if planned else "")))
    rows.append(("parameters", f"{params / 1e6:.1f} M"))
    source, version = meta.get("source", facts["source"]), meta.get("stoptool_version", "?")
    rows.append(("source", f"`{source}`, stoptool {version}"))
    return rows


def _probe_table(probes: list[dict[str, Any]]) -> str:
    if not probes:
        return ("No probe results were found beside the checkpoint (`stoptool probe CKPT` writes "
                "them as `<checkpoint>.probe-<data>.json`).\n")

    def pct(v):
        return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "–"

    lines = ["Frozen features, average-pooled (`last`: the last block; `last4`: the last four, "
             "concatenated), on the test split:", "",
             "| data set | probe | features | labels used | top-1 | top-5 |", "|---|---|---|---|---|---|"]
    for r in probes:
        labels = f"{100 * r['fraction']:g} %" if isinstance(r.get("fraction"), (int, float)) else "?"
        if isinstance(r.get("train"), int):
            labels += f" ({r['train']:,})"
        lines.append(f"| {r['dataset']} | {r.get('method', '?')} | {r.get('layers', '?')} | {labels} | "
                     f"{pct(r.get('top1'))} | {pct(r.get('top5'))} |")
    return "\n".join(lines) + "\n"


def _finetuned_text(facts: dict[str, Any]) -> str:
    """A paragraph on the classifier's fine-tuning, for a fine-tuned one ("" for an encoder)."""
    if not facts.get("num_classes"):
        return ""
    done = facts.get("finetuned") if isinstance(facts.get("finetuned"), dict) else {}
    data = done.get("dataset", "a labelled set")
    return (f"\nThen fine-tuned end to end with labels (`stoptool finetune`), with a linear head of "
            f"{facts['num_classes']} classes on the averaged tokens, on {data}: `model(x)` gives the class "
            "logits.\n")


def _load_text(to: str, facts: dict[str, Any], repo: str) -> str:
    spec, patch = parse_arch(facts["arch"])
    img = facts["img_size"]
    n, d = (img // patch) ** 2, spec.width
    classes = facts.get("num_classes")
    output = (f"logits = model(x)  # [1, {classes}]: the classes' scores" if classes
              else f"features = model(x)  # [1, {d}]: the patch tokens after the final LayerNorm, averaged")
    if to == "hf":
        return f'''```python
import timm
import torch
from PIL import Image

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()  # or "local-dir:path/to/this/folder"
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)  # resize, centre crop, ImageNet mean and std
image = Image.new("RGB", ({img}, {img}))  # your image
x = transform(image).unsqueeze(0)
with torch.no_grad():
    {output}
    tokens = model.forward_features(x)  # [1, {n}, {d}]: every patch token
```
'''
    return f'''```python
import torch
from transformers import IJepaModel

model = IJepaModel.from_pretrained("{repo}").eval()  # or "path/to/this/folder"
# x: [B, 3, {img}, {img}]: resized (bicubic), centre-cropped ({CROP_PCT}), ImageNet mean and std
x = torch.zeros(1, 3, {img}, {img})
with torch.no_grad():
    tokens = model(pixel_values=x).last_hidden_state  # [B, {n}, {d}]: patch tokens after the final LayerNorm
    features = tokens.mean(1)  # [B, {d}]: the pooled features
```
'''


CITATION = """```bibtex
@inproceedings{bar2024stop,
  title     = {Stochastic positional embeddings improve masked image modeling},
  author    = {Bar, Amir and Bordes, Florian and Shocher, Assaf and Assran, Mahmoud and Vincent, Pascal
               and Ballas, Nicolas and Darrell, Trevor and Globerson, Amir and LeCun, Yann},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  series    = {PMLR}, volume = {235}, pages = {2944--2958}, year = {2024},
  eprint    = {2308.00566}, archivePrefix = {arXiv}
}
@inproceedings{assran2023ijepa,
  title     = {Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture},
  author    = {Assran, Mahmoud and Duval, Quentin and Misra, Ishan and Bojanowski, Piotr and Vincent, Pascal
               and Rabbat, Michael and LeCun, Yann and Ballas, Nicolas},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023},
  eprint    = {2301.08243}, archivePrefix = {arXiv}
}
```
"""


def model_card(to: str, facts: dict[str, Any], meta: dict[str, Any], params: int,
               probes: list[dict[str, Any]], repo: str, license: str | None) -> str:
    """`README.md`: YAML front matter for the Hub, then what the model is and how to use it."""
    library = "timm" if to == "hf" else "transformers"
    front = ["---", f"library_name: {library}"] + ([f"license: {license}"] if license else [])
    classes = facts.get("num_classes")
    front += [f"pipeline_tag: {'image-classification' if classes else 'image-feature-extraction'}", "tags:"]
    front += [f"- {t}" for t in ("stop", "ijepa", "self-supervised", "masked-image-modeling",
                                 "vision-transformer", "image-feature-extraction", library)]
    how, which = _what_text(facts)
    spec, patch = parse_arch(facts["arch"])
    img = facts["img_size"]
    method = method_of(facts)
    title = {"stop": f"StoP (σ = {facts.get('sigma')})", "ijepa": "I-JEPA"}.get(method, "I-JEPA / StoP")
    rows = _training_rows(facts, meta, params)
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return "\n".join(front + ["---", ""]) + f"""
# {_arch_name(facts['arch'])} encoder, {title}

A Vision Transformer ({_arch_name(facts['arch'])}, {img} × {img} px input, no class token) pretrained
without labels by masked image modeling in feature space: {how}. This is {which}.
Its output is the patch tokens after the final LayerNorm; average them for one
{spec.width}-dimensional feature per image (timm's `global_pool="avg"`).
{_finetuned_text(facts)}
Exported with stoptool (`stoptool export --to {to}`).

## Training

{table}

## Probe results

{_probe_table(probes)}
## How to load it

{_load_text(to, facts, repo)}
`stoptool import path/to/this/folder encoder.safetensors` reads the folder back into stoptool
(`stoptool probe encoder.safetensors`, `stoptool info`).

## Citation

{CITATION}"""


# -- upload --------------------------------------------------------------------------------


def push_folder(folder: Path, repo: str) -> str:
    """Upload `folder` to the Hub model repository `repo` (created if missing)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload encoder exported by stoptool")
    except Exception as err:  # network, login, permissions: huggingface_hub raises many kinds
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"'{folder}' is written, but uploading it to {repo} failed: {first}; "
                        f"upload it later with: hf upload {repo} {folder}") from None
    return f"https://huggingface.co/{repo}"
