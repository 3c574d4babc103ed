import json
import subprocess
import sys

from stoptool.demo import SEED_GAP, summary


def _plant(path, top1: float) -> None:
    path.write_text(json.dumps({"dataset": "digits", "results": [
        {"method": "logreg", "layers": "last", "top1": top1, "top5": 1.0}]}))


def test_the_demo_ends_with_both_probes_and_the_gap_to_expect(tmp_path):
    _plant(tmp_path / "probe.json", 0.9511)
    _plant(tmp_path / "probe-random-init.json", 0.9444)
    lines = summary(tmp_path).splitlines()
    assert lines[0] == ("probe (logreg probe, last layer, digits test split): trained 95.11 %, random init "
                        "94.44 % (+0.7 points)")
    assert lines[1].startswith(f"at this scale expect +{SEED_GAP[0]:.1f} ± {SEED_GAP[1]:.1f} points")
    assert lines[1].endswith("docs/reproducing.md#eight-seeds-of-the-default-run")
    shown = subprocess.run([sys.executable, "-m", "stoptool.demo", str(tmp_path)], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and shown.stdout.splitlines() == lines


def test_the_gap_quoted_is_the_one_measured_in_the_docs():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    assert f"+{SEED_GAP[0]:.1f} ± {SEED_GAP[1]:.1f} |" in doc  # the mean ± sd row of the eight seeds
