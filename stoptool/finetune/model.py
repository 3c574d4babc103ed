"""What is fine-tuned: the encoder a checkpoint holds (`load_source`, the one place a model
source is read), as timm's ViT with a linear head (`Classifier`), and its layer-decay AdamW.

The classifier is stoptool's encoder unchanged (no class token, fixed sine-cosine positions,
final LayerNorm, average of the tokens) with `head` on that average: the probe's `last`
feature, trained end to end. As a timm `VisionTransformer(num_classes=C, class_token=False,
global_pool="avg", fc_norm=False)` its state dict is timm's, so the export is a plain file.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from stoptool.data.transforms import MEAN, STD
from stoptool.errors import UserError
from stoptool.finetune.config import FinetuneConfig
from stoptool.io.checkpoint import read_meta, resolve_checkpoint
from stoptool.io.export import read_encoder
from stoptool.io.timm_source import TimmEncoder, check_name, check_source, is_timm, load_timm
from stoptool.io.timm_source import describe as describe_timm
from stoptool.models.archs import check_img_size, default_img_size, default_init, parse_arch
from stoptool.models.encoder import build_encoder, timm_kwargs
from stoptool.models.pos_embed import sincos_2d

HEAD_STD = 2e-5  # MAE's initial head: trunc-normal weights of this std, zero bias


class Classifier(VisionTransformer):
    """A stoptool encoder with a linear head, grouped for layer-wise lr decay as MAE and BEiT
    number the layers: patch embedding (and positions) 0, block i -> i + 1, the final norm and
    the head last. (timm's own matcher puts the final norm with the last block: right for its
    models that norm after pooling, one layer off for an encoder that norms before.)"""

    def group_matcher(self, coarse: bool = False) -> dict:
        # names no pattern matches (norm.*, head.*) go to the last group
        stem = r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre"
        return dict(stem=stem, blocks=[(r"^blocks\.(\d+)", None)])


@dataclass
class Source:
    """An encoder to fine-tune, whatever it came from: its arch, the image side it runs at, its
    input normalisation, what the run records of it, and `build(num_classes, drop_path)`, the
    classifier made from its weights (the head drawn from the global random stream)."""

    arch: str
    img_size: int
    build: Callable[[int, float], torch.nn.Module]
    facts: dict = field(default_factory=dict)  # source path, which, kind, σ, step, ...
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @property
    def patch(self) -> int:
        return parse_arch(self.arch)[1]


def describe_source(cfg: FinetuneConfig) -> tuple[str, int]:
    """(arch, image size) of the encoder `cfg` names, from its metadata alone (no weights read):
    what the config's size-dependent values and the run's checks need first. Model sources
    other than stoptool checkpoints enter here and in `load_source`."""
    if cfg.random_init:
        arch, img_size = cfg.arch, cfg.img_size or default_img_size(cfg.arch)
    elif is_timm(cfg.ckpt):
        shape = timm_shape(cfg.ckpt, cfg.img_size)
        arch, img_size = shape.arch, shape.img_size
    else:
        meta = read_meta(resolve_checkpoint(cfg.ckpt))
        arch, img_size = meta["arch"], cfg.img_size or meta["img_size"]
    try:
        check_img_size(arch, img_size, "img_size")
    except UserError as err:
        raise UserError(str(err), key="img_size") from None
    return arch, img_size


def load_source(cfg: FinetuneConfig) -> Source:
    """The encoder `cfg` names, checked and read: the `which` encoder of a stoptool checkpoint
    (any kind `stoptool info` reads), or an untrained one of `arch` drawn from `seed`."""
    arch, img_size = describe_source(cfg)
    if is_timm(cfg.ckpt):
        return timm_source(cfg.ckpt, arch, img_size)
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        init = cfg.init or default_init(arch)
        state = build_encoder(arch, img_size, init).state_dict()
        facts = {"source": "random-init", "arch": arch, "init": init, "seed": cfg.seed}
    else:
        path = resolve_checkpoint(cfg.ckpt)
        state, facts, _ = read_encoder(path, cfg.which)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a new head is trained
        facts = {k: v for k, v in facts.items() if k not in ("num_classes", "classes")}
        facts["source"] = str(path)
        if img_size != facts["img_size"]:  # the positions are fixed sine-cosine: exact at any grid
            spec, patch = parse_arch(arch)
            state["pos_embed"] = sincos_2d(spec.width, img_size // patch)[None]

    def build(classes: int, drop_path: float) -> Classifier:
        return build_classifier(arch, img_size, state, classes, drop_path)

    return Source(arch, img_size, build, facts)


def timm_shape(arg: str, img_size: int | None) -> TimmEncoder:
    """What timm's model `arg` = `timm:NAME` is, built without weights on the meta device (no
    memory, nothing read): its patch and image size, and the stoptool arch of its width and
    depth, which the recipe's size-dependent values are keyed by."""
    name = check_name(arg)
    with torch.device("meta"):
        described = describe_timm(build_timm(name, img_size, pretrained=False), name, arg, pretrained=False)
    if described.arch is None:
        raise UserError(f"{arg} has no stoptool arch of its width and depth ({described.meta['width']} × "
                        f"{described.meta['depth']}), which the recipe's by_size values are keyed by; "
                        "give a ViT-T/S/B/L/H/G model")
    return described


def timm_source(arg: str, arch: str, img_size: int) -> Source:
    """timm's model `arg` with its published weights (the local caches first, as `evaluate`
    reads them), to be fine-tuned as timm builds it: its own tokens, pooling and layer
    grouping for the decay, its own input normalisation, a new head."""
    check_source(arg)
    name = check_name(arg)
    encoder = load_timm(arg, img_size)
    state = {k: v for k, v in encoder.net.state_dict().items() if not k.startswith("head.")}
    del encoder.net

    def build(classes: int, drop_path: float) -> torch.nn.Module:
        model = build_timm(name, img_size, pretrained=False, num_classes=classes, drop_path_rate=drop_path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - {"head.weight", "head.bias"} or unexpected:
            raise UserError(f"{arg}: its weights do not fit the classifier timm builds (missing "
                            f"{sorted(missing)[:3]}, unexpected {unexpected[:3]})")
        _init_head(model)
        return model

    published = {k: v for k, v in encoder.meta.items() if k in ("tag", "hf_hub_id")}
    facts = {"source": encoder.source, "timm_model": name, "arch": arch, "img_size": img_size,
             "patch": encoder.patch_size, **published}
    return Source(arch, img_size, build, facts, encoder.mean, encoder.std)


def build_timm(name: str, img_size: int | None, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """timm's model `name` (no weights: they are loaded by the caller), at `img_size` if given."""
    import timm

    extra = {"img_size": img_size} if img_size is not None else {}
    return timm.create_model(name, pretrained=pretrained, **extra, **kwargs)


def _init_head(model: torch.nn.Module) -> None:
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=HEAD_STD)
        model.head.bias.zero_()


def build_classifier(arch: str, img_size: int, state: dict[str, torch.Tensor] | None, num_classes: int,
                     drop_path: float = 0.0) -> Classifier:
    """The classifier of `arch` at `img_size` with the encoder weights `state` (None: left as
    they are, to be loaded), a new head (MAE's initialization) and timm's stochastic depth."""
    kwargs = {**timm_kwargs(arch, img_size), "num_classes": num_classes, "drop_path_rate": drop_path}
    model = Classifier(**kwargs, weight_init="skip")  # every weight but the head's is loaded
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"head.weight", "head.bias"} or unexpected:
            lacking = sorted(set(missing) - {"head.weight", "head.bias"})[:3]
            raise UserError(f"the encoder's weights do not fit {arch} at {img_size} px (missing {lacking}, "
                            f"unexpected {unexpected[:3]})")
    _init_head(model)
    model.pos_embed.requires_grad_(False)
    return model


class Standardize(torch.nn.Module):
    """Each averaged feature less its mean, over its standard deviation, with statistics fixed
    once (buffers): the probes' standardisation, as the first step of the head."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def add_head_norm(model: VisionTransformer) -> Standardize:
    """Put a `Standardize` between the averaged tokens and the head (timm's `fc_norm` slot)."""
    model.fc_norm = Standardize(model.embed_dim).to(model.pos_embed.device)
    return model.fc_norm


def classifier_tensors(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the encoder under `encoder.`, timm's names after it, the head
    under `head.` and a head norm's statistics under `head_norm.` (`keep` is the Checkpointer's;
    nothing is sharded here)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("fc_norm."):
            out[f"head_norm.{k[len('fc_norm.'):]}"] = v
        else:
            out[k if k.startswith("head.") else f"encoder.{k}"] = v
    return out


def classifier_state(parts) -> dict[str, torch.Tensor]:
    """`classifier_tensors` read back (a checkpoint's `part`): the classifier's state dict."""
    return {**parts("encoder"), **{f"head.{k}": v for k, v in parts("head").items()},
            **{f"fc_norm.{k}": v for k, v in parts("head_norm").items()}}


def make_optimizer(model: Classifier, wd: float, layer_decay: float) -> torch.optim.Optimizer:
    """timm's AdamW over layer-decay groups (`create_optimizer_v2(..., layer_decay=...)`, which
    reads `Classifier.group_matcher`): each group's `lr_scale` is layer_decay^(depth + 1 -
    layer id), and no weight decay on biases, norms and the positions. The fused kernel where
    this torch has one for the device, as pretraining's optimizer."""
    from timm.optim import create_optimizer_v2

    def make(**extra):
        return create_optimizer_v2(model, "adamw", lr=0.0, weight_decay=wd, layer_decay=layer_decay, **extra)

    try:
        return make(fused=True)
    except (RuntimeError, TypeError):
        return make()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group at `lr` times its layer's scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
