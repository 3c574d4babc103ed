"""`stoptool import`: official I-JEPA / StoP checkpoints in, the same model out.

The test writes checkpoints the way the released code does (a `torch.save` dict of DDP
state dicts, the optimizer of its `init_opt`), from reference modules written here after
facebookresearch/ijepa and amirbar/StoP: manual softmax attention, the official forward
passes with their batch order (mask-major), and StoP's masked tokens ψ + A n + b with the
mask token unused. The imported model must compute the same features and predictions.
"""

import collections
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.errors import UserError
from stoptool.io.checkpoint import load_checkpoint, read_meta
from stoptool.io.export import export_timm
from stoptool.io.models import load_model
from stoptool.io.official import import_checkpoint
from stoptool.models.encoder import encode

# -- reference modules in the official layout ----------------------------------------------


def official_sincos(dim: int, grid: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of the official code (numpy, width first)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=float), np.arange(grid, dtype=float)), axis=0)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def apply_masks(x, masks):
    return torch.cat([x.gather(1, m[..., None].expand(-1, -1, x.size(-1))) for m in masks])


class OfficialViT(nn.Module):
    def __init__(self, img, patch, dim, depth, heads):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = PatchEmbed(patch, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, masks=None):
        x = self.patch_embed(x) + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class OfficialPredictor(nn.Module):
    """Parameters registered in the order of the given codebase (it shows in the optimizer)."""

    def __init__(self, n, dim, pdim, depth, heads, stop):
        super().__init__()
        self.stop = stop
        self.predictor_embed = nn.Linear(dim, pdim)
        if not stop:  # I-JEPA registers the mask token before the positions, StoP after all
            self.mask_token = nn.Parameter(torch.zeros(1, 1, pdim))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, n, pdim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(pdim, heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pdim, eps=1e-6)
        self.predictor_proj = nn.Linear(pdim, dim)
        if stop:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, pdim))

    def forward(self, x, masks_x, masks, noise=None):
        """noise: per target mask, [B, K, d_e] (StoP only; the official code draws it)."""
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x = x + apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        n_ctx = x.shape[1]
        if self.stop:  # amirbar/StoP src/deit.py: pos + predictor_embed(noise); no mask token
            rows = []
            for i, m in enumerate(masks):
                pred = apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), [m])
                pred = pred + self.predictor_embed(noise[i])
                rows.append(torch.cat([x, pred], dim=1))
            x = torch.cat(rows)
        else:  # facebookresearch/ijepa: mask_token + pos
            pos = apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks)
            pred = self.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
            x = torch.cat([x.repeat(len(masks), 1, 1), pred], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x)[:, n_ctx:])


SIZES = {"vit_t4": (4, 192, 3), "vit_s8": (8, 384, 6)}  # patch, width, heads (12 deep)
PRED_WIDTH, PRED_DEPTH = 48, 2


def randomize(module: nn.Module, seed: int) -> None:
    """Distinct, non-trivial values everywhere, so a crossed wire cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("pos_embed"):
                continue
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * r)
            elif p.ndim >= 2 and name != "mask_token":
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * r)


def build_official(arch, img, method, seed=0):
    patch, dim, heads = SIZES[arch]
    grid = img // patch
    enc = OfficialViT(img, patch, dim, 12, heads)
    pred = OfficialPredictor(grid * grid, dim, PRED_WIDTH, PRED_DEPTH, heads, method == "stop")
    randomize(enc, seed)
    randomize(pred, seed + 1)
    with torch.no_grad():
        # the stored positions are what counts; perturb them to see they are not recomputed
        sincos = torch.from_numpy(official_sincos(dim, grid)).float()[None]
        enc.pos_embed.copy_(sincos + 0.05 * torch.randn(sincos.shape))
        pred.predictor_pos_embed.copy_(torch.from_numpy(official_sincos(PRED_WIDTH, grid)).float())
    target = OfficialViT(img, patch, dim, 12, heads)
    target.load_state_dict(enc.state_dict())
    randomize(target, seed + 2)  # an EMA copy that has drifted: encoder != target encoder
    with torch.no_grad():
        target.pos_embed.copy_(enc.pos_embed)
    return enc, pred, target


def official_optimizer(enc, pred, method, img, ddp_zero_grad=False):
    """The official init_opt groups and one AdamW step on the StoP or I-JEPA loss.

    ddp_zero_grad: hand the unused mask token a zero gradient instead of none, as DDP may.
    """

    def decayed(name, p):
        return "bias" not in name and p.ndim != 1

    opt = torch.optim.AdamW([
        {"params": [p for n, p in enc.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in pred.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in enc.named_parameters() if not decayed(n, p)], "weight_decay": 0},
        {"params": [p for n, p in pred.named_parameters() if not decayed(n, p)], "weight_decay": 0},
    ], lr=1e-3)
    x = torch.randn(1, 3, img, img)
    n = enc.pos_embed.shape[1]
    ctx, tgt = torch.arange(0, n // 2)[None], torch.arange(n // 2, n)[None]
    noise = [torch.randn(1, tgt.shape[1], enc.pos_embed.shape[-1])] if method == "stop" else None
    loss = pred(enc(x, [ctx]), [ctx], [tgt], noise).square().mean()
    loss.backward()
    if ddp_zero_grad and pred.mask_token.grad is None:
        pred.mask_token.grad = torch.zeros_like(pred.mask_token)
    opt.step()
    return opt.state_dict()


def save_official(path, enc, pred, target, opt_state=None, epoch=7, loss=0.123):
    ddp = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({
        "encoder": ddp(enc), "predictor": ddp(pred), "target_encoder": ddp(target),
        "opt": opt_state, "scaler": None, "epoch": epoch, "loss": loss,
        "batch_size": 4, "world_size": 1, "lr": 1e-3,
    }, path)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def masks(n, batch=2, n_ctx=8, n_tgt=2, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for _ in range(batch)]
    ctx = torch.stack([p[:n_ctx].sort().values for p in perms])
    tgt = torch.stack([p[n_ctx:n_ctx + n_tgt * k].reshape(n_tgt, k) for p in perms])
    return ctx, tgt  # [B, Nc], [B, M, K]


def official_predict(pred, enc, x, ctx, tgt, noise):
    """Official forward, reordered from mask-major to our [B, M, K, d_e]."""
    B, M, K = tgt.shape
    out = pred(enc(x, [ctx]), [ctx], [tgt[:, m] for m in range(M)], noise)
    return out.reshape(M, B, K, -1).transpose(0, 1)


# -- features and predictions --------------------------------------------------------------


@pytest.mark.parametrize("arch,img", [("vit_t4", 16), ("vit_s8", 32)])
@pytest.mark.parametrize("method", ["stop", "ijepa"])
def test_imported_model_matches_the_official_one(tmp_path, arch, img, method):
    torch.manual_seed(0)
    enc, pred, target = build_official(arch, img, method)
    src = tmp_path / "run.pth.tar"
    save_official(src, enc, pred, target)
    out = tmp_path / "imported.safetensors"
    import_checkpoint(src, out, method=method)

    meta = read_meta(out)
    assert meta["kind"] == "imported" and meta["method"] == method
    assert (meta["arch"], meta["img_size"], meta["pred_depth"], meta["pred_width"]) == (
        arch, img, PRED_DEPTH, PRED_WIDTH)
    assert meta["pred_pos"] == "sincos" and meta["epoch"] == 7
    assert meta["sigma"] == (0.25 if method == "stop" else 0.0)

    model = load_model(out, need_predictor=True).model
    x = torch.randn(2, 3, img, img)
    n = (img // SIZES[arch][0]) ** 2
    ctx, tgt = masks(n)
    with torch.no_grad():
        assert rel(encode(model.target_encoder, x), target(x)) < 1e-5
        assert rel(encode(model.encoder, x), enc(x)) < 1e-5
        assert rel(encode(model.encoder, x, keep=ctx), enc(x, [ctx])) < 1e-5
        context = encode(model.encoder, x, keep=ctx)

        # eval: no noise (official StoP with n = 0: ψ + b)
        zero = [torch.zeros(2, tgt.shape[2], enc.pos_embed.shape[-1])] * tgt.shape[1]
        ref = official_predict(pred, enc, x, ctx, tgt, zero if method == "stop" else None)
        assert rel(model.predictor(context, ctx, tgt), ref) < 1e-5

        # training: the same noise draws on both sides
        model.predictor.train()
        torch.manual_seed(123)
        ours = model.predictor(context, ctx, tgt)
        if method == "stop":
            torch.manual_seed(123)
            B, M, K = tgt.shape
            z = torch.randn(B * M, K, enc.pos_embed.shape[-1]).reshape(B, M, K, -1)
            noise = [0.25 * z[:, m] for m in range(M)]  # the official std-σ normal draws
            ref = official_predict(pred, enc, x, ctx, tgt, noise)
            assert rel(ours, official_predict(pred, enc, x, ctx, tgt, zero)) > 1e-3
        assert rel(ours, ref) < 1e-5


def test_stop_mask_token_is_b_and_ijepa_keeps_its_own(tmp_path):
    for method in ("stop", "ijepa"):
        enc, pred, target = build_official("vit_t4", 16, method)
        src = tmp_path / f"{method}.pth.tar"
        save_official(src, enc, pred, target)
        out = tmp_path / f"{method}.safetensors"
        import_checkpoint(src, out, method=method)
        mask_token = load_checkpoint(out).part("predictor")["mask_token"]
        expected = pred.predictor_embed.bias if method == "stop" else pred.mask_token[0, 0]
        assert torch.equal(mask_token[0, 0], expected.detach())
        assert read_meta(out)["mask_token_from"] == (
            "predictor_embed.bias" if method == "stop" else "mask_token")


# -- telling StoP from I-JEPA, σ, arch -----------------------------------------------------


@pytest.mark.parametrize("method,zero_grad", [("stop", False), ("stop", True), ("ijepa", False)])
def test_method_is_read_from_the_optimizer_state(tmp_path, method, zero_grad):
    """StoP never feeds its mask token: AdamW holds no (or zero) moments for it; I-JEPA does."""
    enc, pred, target = build_official("vit_t4", 16, method)
    src = tmp_path / "run.pth.tar"  # a name that says nothing
    opt = official_optimizer(enc, pred, method, 16, ddp_zero_grad=zero_grad)
    save_official(src, enc, pred, target, opt)
    import_checkpoint(src, tmp_path / "out.safetensors")
    meta = read_meta(tmp_path / "out.safetensors")
    assert meta["method"] == method and "optimizer state" in meta["method_from"]


def test_method_from_file_name_or_kind_else_refused(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "stop")
    for name, method in (("stop-latest.pth.tar", "stop"), ("jepa-ep300.pth.tar", "ijepa"),
                         ("vit-h16.pth.tar", "stop"), ("IN1K-vit.h.14-300e.pth.tar", "ijepa")):
        save_official(tmp_path / name, enc, pred, target)  # no optimizer state
        import_checkpoint(tmp_path / name, tmp_path / "out.safetensors")
        assert read_meta(tmp_path / "out.safetensors")["method"] == method, name

    save_official(tmp_path / "run.pth.tar", enc, pred, target)
    out = tmp_path / "none.safetensors"
    with pytest.raises(UserError, match="pass the method, stop or ijepa; it decides the mask token"):
        import_checkpoint(tmp_path / "run.pth.tar", out)
    assert not out.exists()
    import_checkpoint(tmp_path / "run.pth.tar", out, method="stop", sigma=0.4)
    meta = read_meta(out)
    assert (meta["method"], meta["sigma"]) == ("stop", 0.4)
    assert meta["method_from"] == "given by the user"


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "mae"}, "method (what trained the checkpoint) must be one of stop, ijepa, got 'mae'"),
    ({"sigma": -0.5}, "sigma must be >= 0 (it is the noise standard deviation), got -0.5"),
    ({"sigma": float("nan")}, "sigma must be >= 0 (it is the noise standard deviation), got nan"),
])
def test_bad_arguments_are_refused_by_their_names_before_anything_is_read(tmp_path, kwargs, message):
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError) as err:
        import_checkpoint(tmp_path / "absent.pth.tar", out, **kwargs)
    assert str(err.value) == message
    assert not out.exists()


def test_sigma_without_a_predictor_is_noted_as_ignored(tmp_path):
    enc, _, _ = build_official("vit_t4", 16, "ijepa")
    torch.save(enc.state_dict(), tmp_path / "encoder.pth")
    res = import_checkpoint(tmp_path / "encoder.pth", tmp_path / "out.safetensors", sigma=0.3)
    assert "sigma ignored: the file holds no predictor" in res.notes and "sigma" not in res.meta


def test_arch_override_is_checked_against_the_shapes(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / "ijepa.pth.tar"
    save_official(src, enc, pred, target)
    import_checkpoint(src, tmp_path / "a.safetensors", arch="vit_t4")
    with pytest.raises(UserError, match="does not match vit_s4"):
        import_checkpoint(src, tmp_path / "b.safetensors", arch="vit_s4")
    with pytest.raises(UserError, match="unknown arch"):
        import_checkpoint(src, tmp_path / "b.safetensors", arch="resnet50")
    assert not (tmp_path / "b.safetensors").exists()


# -- refusals ------------------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


class NamedDict(collections.OrderedDict):
    pass


@pytest.mark.parametrize("payload,named", [(Payload(), "builtins.print"),
                                           (NamedDict(a=torch.zeros(1)), "NamedDict")])
def test_a_pickled_callable_is_refused(tmp_path, capsys, payload, named):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / "evil.pth.tar"
    torch.save({"encoder": enc.state_dict(), "predictor": pred.state_dict(),
                "target_encoder": target.state_dict(), "extra": payload}, src)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError, match="arbitrary unpickling") as err:
        import_checkpoint(src, out, method="ijepa")
    assert named in str(err.value)
    assert "this must never run" not in capsys.readouterr().out
    assert not out.exists()


def test_a_bare_pickle_of_a_recent_protocol_naming_a_callable_is_refused_by_name(tmp_path, capsys):
    """Not a torch.save file: a plain pickle (protocol 5), which torch's safe loader cannot
    even parse. The refusal still names the callable, found without running the pickle, and
    torch's warning about the protocol stays off the terminal."""
    import pickle

    class Eval:
        def __reduce__(self):
            return (eval, ("0",))

    src = tmp_path / "evil.pth.tar"
    # two callables of one module: protocol 5 names the module once and fetches it from the memo
    payload = {"encoder": collections.OrderedDict(x=1), "a": Payload(), "b": Eval()}
    src.write_bytes(pickle.dumps(payload, protocol=5))
    result = CliRunner().invoke(app, ["import", str(src), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (  # OrderedDict is one torch's safe loader takes: not named
        f"error: '{src}' needs arbitrary unpickling to load (it references builtins.eval, builtins.print); "
        "stoptool only reads tensors and plain containers (torch.load(weights_only=True)) and refuses it")
    assert "this must never run" not in capsys.readouterr().out + result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth.tar"]


def test_cli_refusal_is_one_line_and_exit_code_2(tmp_path):
    src = tmp_path / "evil.pth.tar"
    torch.save({"encoder": {"x": torch.zeros(1)}, "extra": Payload()}, src)
    result = CliRunner().invoke(app, ["import", str(src), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert "arbitrary unpickling" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.import.json").exists()


@pytest.mark.parametrize("part,drop,named", [
    ("encoder", "blocks.3.", "blocks.3.attn.qkv.weight"),
    ("target_encoder", "blocks.11.", "blocks.11.mlp.fc2.bias"),  # the last block: not just a gap
    ("predictor", "predictor_blocks.0.", "predictor_blocks.0.norm1.weight"),
])
def test_a_missing_block_is_refused_with_the_key_named(tmp_path, part, drop, named):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / "ijepa.pth.tar"
    save_official(src, enc, pred, target)
    ckpt = torch.load(src, weights_only=True)
    ckpt[part] = {k: v for k, v in ckpt[part].items() if not k.startswith("module." + drop)}
    torch.save(ckpt, src)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError, match="missing") as err:
        import_checkpoint(src, out)
    assert named in str(err.value)
    assert not out.exists()


def test_unexpected_and_misshapen_keys_are_listed(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / "ijepa.pth.tar"
    save_official(src, enc, pred, target)
    ckpt = torch.load(src, weights_only=True)
    ckpt["encoder"]["module.cls_token"] = torch.zeros(1, 1, 192)
    ckpt["encoder"]["module.norm.bias"] = torch.zeros(7)
    torch.save(ckpt, src)
    with pytest.raises(UserError) as err:
        import_checkpoint(src, tmp_path / "out.safetensors")
    assert "unexpected: cls_token" in str(err.value)
    assert "norm.bias (7,)" in str(err.value)


def test_numpy_scalars_are_read_not_refused(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / "jepa-latest.pth.tar"
    save_official(src, enc, pred, target, epoch=np.int64(3), loss=np.float64(0.5))
    import_checkpoint(src, tmp_path / "out.safetensors")
    meta = read_meta(tmp_path / "out.safetensors")
    assert (meta["epoch"], meta["source_loss"]) == (3, 0.5)


def test_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(UserError, match="is not a checkpoint: torch.save writes a zip archive or a pickle"):
        import_checkpoint(bad, tmp_path / "out.safetensors")
    bad.write_bytes(b"PK\x03\x04" + b"truncated zip" * 10)  # looks like torch.save's, is not whole
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        import_checkpoint(bad, tmp_path / "out.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        import_checkpoint(tmp_path / "missing.pth.tar", tmp_path / "out.safetensors")
    torch.save({"optimizer": {"lr": 1}}, bad)
    with pytest.raises(UserError, match="top-level keys are: optimizer"):
        import_checkpoint(bad, tmp_path / "out.safetensors")


# -- encoder-only files, and on to timm ----------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_only_file_imports_as_encoder_only(tmp_path, suffix):
    from safetensors.torch import save_file

    enc, _, _ = build_official("vit_t4", 16, "ijepa")
    src = tmp_path / f"encoder{suffix}"
    if suffix == ".pth":
        torch.save(enc.state_dict(), src)
    else:
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(src))
    out = tmp_path / "out.safetensors"
    res = import_checkpoint(src, out)
    assert res.parts == ["target_encoder"] and "sigma" not in res.meta
    loaded = load_model(out)  # what `stoptool probe` calls
    assert loaded.model.predictor is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel(encode(loaded.model.target_encoder, x), enc(x)) < 1e-5
    with pytest.raises(UserError, match="needs a predictor"):
        load_model(out, need_predictor=True)


def test_round_trip_import_export_timm_equals_the_original(tmp_path):
    arch, img = "vit_t4", 16
    enc, pred, target = build_official(arch, img, "stop")
    src = tmp_path / "stop.pth.tar"
    save_official(src, enc, pred, target)
    import_checkpoint(src, tmp_path / "imported.safetensors")
    res = export_timm(tmp_path / "imported.safetensors", tmp_path / "timm.safetensors")
    scope: dict = {}
    exec(res.line, scope)  # the printed line, as a user would paste it
    model = scope["model"].eval()
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        assert rel(model(x), target(x).mean(1)) < 1e-5


def test_cli_import_then_info(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "stop")
    src = tmp_path / "stop-ep300.pth.tar"
    save_official(src, enc, pred, target)
    out = tmp_path / "out.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["import", str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert "vit_t4" in result.output and "predictor_embed.bias" in result.output
    report = json.loads((tmp_path / "out.import.json").read_text())
    assert report["checkpoint"] == str(out) and report["source_file"] == str(src)
    assert report["arch"] == "vit_t4" and report["method"] == "stop" and report["params"]["predictor"] > 0
    method_from = load_checkpoint(out).meta["method_from"]
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("imported", "stop-ep300.pth.tar", "predictor params", f"stop ({method_from})"):
        assert text in result.output


def test_weights_of_a_diverged_run_are_refused_at_import(tmp_path):
    enc, pred, target = build_official("vit_t4", 16, "ijepa")
    with torch.no_grad():
        target.blocks[2].attn.qkv.weight[0, 0] = float("inf")
    src = tmp_path / "ijepa.pth.tar"
    save_official(src, enc, pred, target)
    out = tmp_path / "out.safetensors"
    named = r"not finite \(NaN or inf\) in 1 tensor, first 'target_encoder.blocks.2"
    with pytest.raises(UserError, match=named):
        import_checkpoint(src, out, method="ijepa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ijepa.pth.tar"]
