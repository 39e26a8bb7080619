"""gan_plots: the figures a run saves, drawn from a history like the notebooks keep."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: plt.show() is then a no-op
import matplotlib.axes  # noqa: E402

from gan import plots as gp


def row(epoch: int, scored: bool) -> dict:
    out = {"epoch": epoch, "train_seconds": 10.0 * epoch, "fd": 5.0 / epoch}
    if scored:
        out.update(score=7.0 + 0.1 * epoch, **{f"frac_{c}": 0.1 for c in range(10)})
    return out


def test_quality_plot_draws_a_run_resumed_onto_data_with_classes(tmp_path):
    # Two epochs on a folder of faces (FD only), then resumed on CIFAR-10 (class scores too).
    history = [row(1, False), row(2, False), row(3, True), row(4, True)]
    assert gp.plot_quality(history, tmp_path / "q.png", real_score=9.5, class_names=[str(c) for c in range(10)])
    assert (tmp_path / "q.png").stat().st_size > 0


def test_quality_plot_of_a_folder_without_classes_and_of_no_scores(tmp_path):
    assert gp.plot_quality([row(1, False), row(2, False)], tmp_path / "fd.png", real_score=None, class_names=None)
    assert (tmp_path / "fd.png").exists()
    assert not gp.plot_quality([{"epoch": 1, "train_seconds": 1.0}], tmp_path / "none.png", None, None)
    assert not (tmp_path / "none.png").exists()


def test_training_plot_marks_each_games_equilibrium(tmp_path, monkeypatch):
    lines = []
    real_axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: lines.append(y) or real_axhline(ax, y, **kw))
    history = [{"epoch": e, "d_loss": 1.2, "g_loss": 0.9, "d_x": 0.6, "d_g_z": 0.4} for e in (1, 2)]
    for loss, there in (("bce", [1.3863, 0.5]), ("hinge", [2.0, 0.0]), ("least_squares", [0.25, 0.5])):
        lines.clear()
        gp.plot_training(history, tmp_path / f"{loss}.png", loss)
        assert [round(y, 4) for y in lines] == there and (tmp_path / f"{loss}.png").stat().st_size > 0
