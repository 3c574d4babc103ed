"""Training curves (paper Fig. 4) read from the metrics log that `pretrain` writes."""

import json

import pytest
from typer.testing import CliRunner

from stoptool.cli import app
from stoptool.errors import UserError
from stoptool.viz.curves import PANELS, draw_curves, read_run

runner = CliRunner(env={"COLUMNS": "400"})


def test_read_run_gets_every_logged_step_and_sigma(tiny_run):
    run = read_run(tiny_run)
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert run.sigma == 0.25
    assert [r["step"] for r in run.rows] == [r["step"] for r in logged] == [1, 2, 3]
    steps, a_norm = run.series("A_norm")
    assert steps == [1, 2, 3] and a_norm == [r["A_norm"] for r in logged]


def test_each_panel_has_one_line_per_run_with_its_data(tiny_run, tmp_path):
    other = tmp_path / "sigma0"
    other.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "A_norm": 2.0, "mask_token_norm": 0.5}
            for s in (10, 20)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (other / "config.yaml").write_text("sigma: 0.0\n")
    fig = draw_curves([read_run(tiny_run), read_run(other)])
    axes = fig.axes[: len(PANELS)]
    for ax, (key, _) in zip(axes, PANELS, strict=True):
        assert len(ax.lines) == 2
        first = ax.lines[0]  # sorted by σ: the σ = 0 run comes first
        assert list(first.get_xdata()) == [10, 20]
        assert list(first.get_ydata()) == [r[key] for r in rows]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["σ = 0 (sigma0)", "σ = 0.25 (run)"]


def test_a_half_written_last_line_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    run = read_run(tmp_path)
    assert [r["step"] for r in run.rows] == [1] and run.sigma is None


def test_a_broken_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_run(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"step": 1}\n[1, 2]\n{"step": 3}\n', "line 2 is not a metrics row"),
        (b'{"step": "x", "loss": "y"}\n{"step": 2}\n', "line 1 is not a metrics row"),
        (b'{"step": 1, "loss": "high"}\n{"step": 2}\n', "line 1 is not a metrics row"),
        (bytes(range(128, 256)), "is not text: not a metrics log"),
    ],
)
def test_a_log_that_is_not_metrics_is_an_error(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    result = runner.invoke(app, ["viz", "curves", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.png").exists()


def test_directory_without_metrics_fails_with_one_line(tiny_run, tmp_path):
    result = runner.invoke(app, ["viz", "curves", str(tiny_run), str(tmp_path),
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"'{tmp_path}' has no metrics.jsonl: not a stoptool run directory" in lines[0]
    assert not (tmp_path / "c.png").exists()


def test_missing_directory_fails_with_one_line(tmp_path):
    result = runner.invoke(app, ["viz", "curves", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_knn_and_rankme_get_panels_when_a_run_logged_them(tiny_run, tmp_path):
    from stoptool.viz.curves import EXTRA_PANELS

    watched = tmp_path / "watched"
    watched.mkdir()
    rows = [{"step": 0, "knn_top1": 0.5},
            {"step": 10, "loss": 0.4, "lr": 1e-3, "A_norm": 2.0, "mask_token_norm": 0.5, "rankme": 30.0},
            {"step": 10, "alarm": "collapse", "message": "..."},
            {"step": 20, "loss": 0.3, "lr": 1e-3, "A_norm": 2.1, "mask_token_norm": 0.6, "rankme": 25.0,
             "knn_top1": 0.7}]
    (watched / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = draw_curves([read_run(watched), read_run(tiny_run)])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [name for _, name in PANELS + EXTRA_PANELS]
    knn, rank = visible[len(PANELS)], visible[len(PANELS) + 1]
    line = {ln.get_label(): ln for ln in knn.lines}["σ = ? (watched)"]  # the run with no σ comes last
    assert list(line.get_xdata()) == [0, 20] and list(line.get_ydata()) == [0.5, 0.7]
    assert list({ln.get_label(): ln for ln in rank.lines}["σ = ? (watched)"].get_ydata()) == [30.0, 25.0]
    # a run without the online k-NN (tiny_run logs rankme, not knn_top1) gets no k-NN panel
    titles = [ax.get_title() for ax in draw_curves([read_run(tiny_run)]).axes if ax.get_visible()]
    assert titles == [name for _, name in PANELS] + ["RankMe (target features)"]


def test_a_run_logged_at_few_steps_is_drawn_as_points_and_says_which_flag_gives_a_curve(tmp_path):
    from stoptool.viz.curves import make_curves

    run = tmp_path / "short"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "A_norm": 2.0, "mask_token_norm": 0.5} for s in (10, 60)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("sigma: 0.25\n")
    result = make_curves([run], tmp_path / "c.png")
    said = "2 logged steps, so its lines are straight between them; pretrain with --log-every 2 for a curve"
    assert result.rows["note (σ = 0.25 (short))"] == said
    fig = draw_curves([read_run(run)])
    assert fig.texts[-1].get_text() == f"σ = 0.25 (short): {said}"  # on the figure too
    assert all(line.get_marker() == "o" for ax in fig.axes[:4] for line in ax.lines)
    longer = [{**rows[0], "step": s} for s in range(10, 70, 10)]  # six logged steps: a curve; the title alone
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in longer))
    assert len(draw_curves([read_run(run)]).texts) == 1 and "note (σ = 0.25 (short))" not in make_curves(
        [run], tmp_path / "d.png").rows
