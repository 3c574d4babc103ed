"""The paper's layout: each encoder with the paper's rows of its arch below it, the rest after,
one column per task, and the same numbers in the terminal, Markdown and JSON."""

from pathlib import Path

from stoptool.evaluate.suite import load_suite
from stoptool.evaluate.table import EvaluateReport


def _model(label: str, arch: str | None, top1: dict) -> dict:
    return {"label": label, "arch": arch, "source": label, "meta": {},
            "results": {c: {"protocol": "paper", "top1": v} for c, v in top1.items()}}


def test_rows_are_grouped_by_arch_with_the_papers_rows_below_each_group():
    suite = load_suite("table4")
    models = [_model("ijepa-b", "vit_b16", {"CIFAR100": 0.6912}),
              _model("timm:mae", "vit_l16", {"iNat18": 0.33}),
              _model("stop-b", "vit_b16", {"CIFAR100": 0.8125, "CLEVR/Dist": 0.7})]
    report = EvaluateReport(suite, models, [], Path("t.json"), Path("t.md"), Path("t.png"))
    assert [r["name"] for r in report.ordered()] == [
        "ijepa-b", "stop-b", "paper: I-JEPA", "paper: StoP",  # ViT-B/16
        "timm:mae", "paper: MAE", "paper: I-JEPA", "paper: StoP",  # ViT-L/16
        "paper: I-JEPA", "paper: StoP"]  # ViT-H/14: no encoder of it here
    rows = report.table()
    assert report.header() == ("model", "arch", "CIFAR100", "Places205", "iNat18", "CLEVR/Count",
                               "CLEVR/Dist")
    assert rows[1] == ("stop-b", "ViT-B/16", "81.2", "-", "-", "-", "70.0")
    assert rows[3] == ("paper: StoP", "ViT-B/16", "81.2", "54.3", "44.7", "83.7", "71.3")
    assert rows[5] == ("paper: MAE", "ViT-L/16", "77.4", "54.4", "33.0", "92.1", "73.0")
    md = report.markdown()
    assert "| **stop-b** | ViT-B/16 | 81.2 | - | - | - | 70.0 |" in md
    assert "| *paper: StoP* | ViT-H/14 | 87.7 | 58.4 | 50.9 | 88.0 | 72.5 |" in md
    assert report.to_dict()["table"] == report.ordered()
