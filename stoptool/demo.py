"""The closing lines of `make demo`: the trained and the random-init encoder's probe results
side by side, and the gap to expect at the demo's scale.

    python -m stoptool.demo RUN_DIR
"""

import json
import sys
from pathlib import Path

# Eight seeds of the default demo run, each probed beside its own initial weights (logistic
# probe, last layer, digits test split): docs/reproducing.md, "Eight seeds of the default run".
SEED_GAP = (0.7, 1.0)  # mean and sd of trained − random-init top-1, points
SEEDS_DOC = "docs/reproducing.md#eight-seeds-of-the-default-run"


def _first_row(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {**report["results"][0], "dataset": report["dataset"]}


def summary(run_dir: Path) -> str:
    """The demo's closing lines, from the probe results `make demo` wrote into `run_dir`."""
    trained = _first_row(run_dir / "probe.json")
    random_init = _first_row(run_dir / "probe-random-init.json")
    gap = 100 * (trained["top1"] - random_init["top1"])
    mean, sd = SEED_GAP
    what = f"{trained['method']} probe, {trained['layers']} layer, {trained['dataset']} test split"
    return "\n".join([
        f"probe ({what}): trained {100 * trained['top1']:.2f} %, random init "
        f"{100 * random_init['top1']:.2f} % ({gap:+.1f} points)",
        f"at this scale expect {mean:+.1f} ± {sd:.1f} points (8 seeds of this run; a seed can land below its "
        f"random init): the demo checks the pipeline end to end, the method's gain shows at ImageNet scale; "
        f"see {SEEDS_DOC}",
    ])


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
