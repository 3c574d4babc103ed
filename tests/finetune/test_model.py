"""The classifier fine-tuning trains, and its layer-wise learning rates."""

import re

import pytest
import torch
import torch.nn.functional as F

from stoptool.finetune.model import build_classifier, make_optimizer
from stoptool.finetune.step import Batch, FinetuneState, finetune_step
from stoptool.models.encoder import build_encoder, encode
from stoptool.train.distributed import Nets
from stoptool.train.optim import make_scaler
from stoptool.train.runtime import autocast_factory
from stoptool.train.schedules import Hyper

ARCH, IMG, CLASSES = "vit_t4", 16, 7


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(ARCH, IMG).eval()


def state_of(model, layer_decay: float, wd: float = 0.05) -> FinetuneState:
    cpu = torch.device("cpu")
    return FinetuneState(model, make_optimizer(model, wd, layer_decay), make_scaler(cpu, "fp32"),
                         Nets(model, model, None), autocast_factory(cpu, "fp32"), torch.nn.CrossEntropyLoss())


def layer_id(name: str, depth: int) -> int:
    """MAE's and BEiT's numbering: the patch embedding 0, block i -> i + 1, the rest (the final
    norm, the head) last."""
    if name.startswith("patch_embed."):
        return 0
    block = re.match(r"blocks\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else depth + 1


def test_each_layer_learns_at_lr_times_decay_to_its_depth_from_the_top(encoder):
    model = build_classifier(ARCH, IMG, encoder.state_dict(), CLASSES).train()
    depth, decay, lr = len(model.blocks), 0.75, 1e-3
    state = state_of(model, decay)
    x, y = torch.randn(4, 3, IMG, IMG), torch.arange(4)
    finetune_step(state, Batch(x, y), Hyper(lr, 0.05, 0.0))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in state.optimizer.param_groups:  # the rates the step ran at, as the optimizer holds them
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            want = lr * decay ** (depth + 1 - layer_id(name, depth))
            assert group["lr"] == pytest.approx(want, rel=1e-12), name
            # no decay on biases, norms' scales (1-D), and the fixed positions are not trained at all
            assert group["weight_decay"] == (0.0 if p.ndim == 1 else 0.05), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and "pos_embed" not in seen
    ids = {layer_id(n, depth) for n in seen}
    assert ids == set(range(depth + 2))  # the embedding, every block, and the top (norm and head)
    assert {"norm.weight", "head.weight"} <= {n for n in seen if layer_id(n, depth) == depth + 1}


def test_the_classifier_is_the_encoders_pooled_features_through_a_linear_head(encoder):
    model = build_classifier(ARCH, IMG, encoder.state_dict(), CLASSES, drop_path=0.2).eval()
    assert model.head.weight.abs().max() < 1e-4 and not model.head.bias.any()  # MAE's new head
    with torch.no_grad():
        model.head.weight.normal_()
        x = torch.randn(3, 3, IMG, IMG)
        want = F.linear(encode(encoder, x).mean(1), model.head.weight, model.head.bias)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not model.pos_embed.requires_grad


def test_a_bad_step_changes_no_weight(encoder):
    model = build_classifier(ARCH, IMG, encoder.state_dict(), CLASSES).train()
    state = state_of(model, 0.75)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.full((2, 3, IMG, IMG), float("nan"))
    finetune_step(state, Batch(x, torch.zeros(2, dtype=torch.int64)), Hyper(1e-3, 0.05, 0.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(Exception, match="loss is nan"):
        state.guard.check(0)
