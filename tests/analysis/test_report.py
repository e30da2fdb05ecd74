"""The claims report on a small real capture: every number recomputed through the reader's own
accessors (select_topk + block_recall per step and layer), the files, the CLI and the errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfsviz.cli.report  # noqa: F401  (registers `dfsviz report` until the lead adds it to the CLI)
from dfsviz.analysis import report as report_mod
from dfsviz.analysis.report import ClaimsReport, ReportConfig, build_report, default_schedule
import dfsviz
from dfsviz.analysis.sweeps import write_token_model_capture
from dfsviz.capture import CaptureWriter, open_capture
from dfsviz.capture.schema import step_key
from dfsviz.cli import main
from dfsviz.figures import FACTOR_LABELS
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall, oracle_recall
from dfsviz.sparse.tokenmodel import TokenModelConfig
from git_reference import module_at_commit  # tests/ is on sys.path


@pytest.fixture(scope="module")
def built(token_capture):
    return build_report(token_capture)


def test_violations_cover_every_row(token_capture, built):
    v = built.data["violations"]
    with open_capture(token_capture) as r:
        rows = len(r.orders) * len(r.methods) * 3 * len(r.steps) * len(r.layers) * len(r.heads) * r.layout.num_blocks
    assert v["rows"] == rows
    assert v["bound2"] == v["bound3"] == v["bound3_over_bound2"] == 0 and built.violations == 0
    assert v["max_excess"] < 0


def test_bound1_on_stored_qkv(token_capture, built, tmp_path):
    b1 = built.data["bound1"]
    with open_capture(token_capture) as r:
        assert b1["layers"] == [1] == list(r.layout.qkv_layers)
        assert b1["rows"] == len(r.steps) * len(r.orders) * len(r.heads) * r.grid.num_tokens
        assert b1["steps"] == r.steps
    assert b1["violations"] == 0 and b1["max_excess"] <= 0 and b1["budget"] == 0.2 and b1["method"] == "dfs_tile"
    path = write_token_model_capture(tmp_path / "noqkv.h5", TokenModelConfig(LatentGrid(2, 8, 8), heads=1, head_dim=8),
                                     steps=(0,), num_steps=1, block=16)
    no_qkv = build_report(path, ReportConfig(budgets=(0.2,)))
    assert no_qkv.data["bound1"] is None and "capture with --save-qkv" in no_qkv.markdown()
    assert build_report(token_capture, ReportConfig(budgets=(0.2,), bound1=False)).data["bound1"] is None


def test_report_on_a_real_model_capture(tiny_capture):
    """The capture runner's file of a (random-weight) diffusers Wan model: every claim computes."""
    report = build_report(tiny_capture)
    data = report.data
    with dfsviz.open(tiny_capture) as r:
        rows = len(r.orders) * len(r.methods) * 3 * len(r.steps) * len(r.layers) * len(r.heads) * r.layout.num_blocks
        assert data["violations"]["rows"] == rows and report.violations == 0
        assert data["bound1"]["violations"] == 0 and data["bound1"]["layers"] == [1]
        first = data["recall"][0]
        expected = np.mean([float(r.recall(s, l, first["order"], first["method"], gamma=0.2).mean())
                            for s in r.steps for l in r.layers])
    assert first["recall"]["0.2"] == pytest.approx(expected, abs=1e-12)
    assert data["drift"]["replay"]["steps"] == [0, 3] and data["drift"]["at_interval"] is None
    assert {"mask_raster", "mask_hilbert3d", "footprint", "schedule"} <= set(report.figures)


def test_recall_table_matches_the_reader(token_capture, built):
    """Recall, density and oracle gap per (method, order, budget) from select_topk + block_recall."""
    with dfsviz.open(token_capture) as r:
        n, b, mk = r.grid.num_tokens, r.block, r.layout.num_blocks
        cells = [(s, l) for s in r.steps for l in r.layers]
        for row in built.data["recall"]:
            o, m = row["order"], row["method"]
            maps = [(r.block_stats(s, l, o).m, r.scores(s, l, o, m)) for s, l in cells]

            def mean_recall(k):
                masks = [select_topk(sc, k / mk, seq_len=n, block=b) for _, sc in maps]
                return (np.mean([float(block_recall(mass, mask).mean()) for (mass, _), mask in zip(maps, masks)]),
                        np.mean([float(mask.density().mean()) for mask in masks]))

            for g in (0.1, 0.2, 0.3):
                k = max(1, int(g * mk))
                recall, density = mean_recall(k)
                oracle = np.mean([float(oracle_recall(mass, k, seq_len=n, block=b).mean()) for mass, _ in maps])
                assert row["recall"][f"{g:g}"] == pytest.approx(recall, abs=1e-12)
                assert row["density"][f"{g:g}"] == pytest.approx(density, abs=1e-12)
                assert row["oracle_gap"][f"{g:g}"] == pytest.approx(oracle - recall, abs=1e-12)
            # The needed budget is the smallest k / Mk whose mean recall reaches the target.
            k = round(row["needed_budget"]["0.9"] * mk)
            assert mean_recall(k)[0] >= 0.9 - 1e-9 and (k == 1 or mean_recall(k - 1)[0] < 0.9)
        first = built.data["recall"][0]
        step = r.steps[0]
        per_layer = [float(r.recall(step, l, first["order"], first["method"], gamma=0.2).mean()) for l in r.layers]
        assert first["by_step"]["0.2"][str(step)] == pytest.approx(np.mean(per_layer), abs=1e-12)


def test_order_comparison_matches_stored_variance_ratios(token_capture, built):
    rows = {row["factor"]: row for row in built.data["order_comparison"]["rows"]}
    assert set(rows) == {"W_q", "W_k", "gap", "r_u", "J_u", "effective_gap"}
    with open_capture(token_capture) as r:
        for order, key in (("raster", "base_mean"), ("hilbert3d", "other_mean")):
            w_k = torch.cat([r.variance_ratios(s, l, order)[1] for s in r.steps for l in r.layers])
            assert rows["W_k"][key] == pytest.approx(float(w_k.mean()), rel=1e-12)
        assert rows["W_k"]["pairs"] == len(r.steps) * len(r.layers) * len(r.heads)
    assert rows["W_k"]["relative_change"] == pytest.approx(
        (rows["W_k"]["other_mean"] - rows["W_k"]["base_mean"]) / rows["W_k"]["base_mean"])


def test_drift_and_replay_match_the_reader(token_capture, built):
    d = built.data["drift"]
    with open_capture(token_capture) as r:
        sched = default_schedule(10)
        assert d["schedule"] == sched.name and d["interval"] == sched.interval == 2
        n, b, g0 = r.grid.num_tokens, r.block, sched.gamma0

        def reused(s, t, layer):
            mask = select_topk(r.scores(s, layer, "hilbert3d", "dfs_tile"), g0, seq_len=n, block=b)
            return float(block_recall(r.block_stats(t, layer, "hilbert3d").m, mask).mean())

        at = d["at_interval"]
        assert at["pairs"] == [[0, 2], [3, 5]] or at["pairs"] == [(0, 2), (3, 5)]
        expected = np.mean([reused(s, t, l) for l in r.layers for s, t in ((0, 2), (3, 5))])
        assert at["recall"] == pytest.approx(expected, abs=1e-12)
        rep = d["replay"]
        assert rep["steps"] == [0, 2, 3, 6, 9] and rep["skipped"] == [5]
        assert rep["mask_step"] == [None, 2, 2, 6, 6]
        assert rep["recall_cached"][0] == pytest.approx(1.0, abs=1e-5)
        assert rep["recall_cached"][1] == rep["recall_fresh"][1]
        # Step 3 reuses the step-2 mask chosen at step 2's budget.
        cached = np.mean([float(block_recall(r.block_stats(3, l, "hilbert3d").m, select_topk(
            r.scores(2, l, "hilbert3d", "dfs_tile"), sched.at_step(2).gamma, seq_len=n, block=b)).mean()) for l in r.layers])
        assert rep["recall_cached"][2] == pytest.approx(cached, abs=1e-12)
    assert any("skipped steps [5]" in note for note in built.notes)


def test_figures_and_markdown(built):
    names = set(built.figures)
    assert {"recall_budget", "bound_vs_measured", "recall_vs_gap", "factor_W_q", "factor_W_k", "mask_raster",
            "mask_hilbert3d", "drift_recall", "drift_jaccard", "schedule", "footprint"} <= names
    assert len(built.figures["recall_budget"].data) == 3 * 2 + 2  # methods x orders, then one oracle per order
    bound = built.figures["bound_vs_measured"]
    assert bound.data[-1].name == "violations" and len(bound.data[-1].x) == 0
    sched = {t.name: t for t in built.figures["schedule"].data}
    rep = built.data["drift"]["replay"]
    cached = np.asarray(sched["recall, cached masks"].y, dtype=float)
    np.testing.assert_allclose(cached[rep["steps"]], rep["recall_cached"])
    assert np.isnan(np.delete(cached, rep["steps"])).all()
    np.testing.assert_allclose(np.asarray(sched["density, cached masks"].y, dtype=float)[rep["steps"]], rep["density_cached"])
    assert list(sched["refresh"].x) == [s for s in range(10) if default_schedule(10).at_step(s).refresh]
    md = built.markdown()
    assert "**0 violations of Bounds 2 and 3 (PASS)**" in md
    assert "Bound 1 (row-wise) on the stored Q/K of layers [1] at steps [0, 2, 3, 5, 6, 9], dfs_tile at γ = 0.2: " \
        "**0 violations**" in md
    assert f"| {FACTOR_LABELS['W_k']} |" in md
    assert "| dfs_tile | hilbert3d |" in md
    assert "(figures/recall_budget.html)" in md


def test_write_files(tmp_path, built, monkeypatch):
    written = built.write(tmp_path / "out", png=False)
    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())  # strict JSON: no NaN / Infinity tokens
    assert data["violations"]["rows"] == built.data["violations"]["rows"]
    assert data["recall"][0]["recall"] == built.data["recall"][0]["recall"]
    assert (out / "report.md").read_text() == built.markdown()
    assert len(written["html"]) == len(built.figures) and written["png"] == []
    assert (out / "figures" / "plotly.min.js").exists()
    assert "plotly.min.js" in (out / "figures" / "schedule.html").read_text()
    with monkeypatch.context() as no_kaleido:
        no_kaleido.setattr(report_mod, "_kaleido_installed", lambda: False)
        with pytest.raises(ValueError, match=r"PNG export needs kaleido: install it with `pip install 'dfsviz\[png\]'`"):
            built.write(tmp_path / "png", png=True)
        assert built.write(tmp_path / "auto")["png"] == []  # auto: no kaleido, no PNG
    monkeypatch.setattr(report_mod, "chromium_available", lambda: False)
    with pytest.raises(ValueError, match="PNG export needs Chromium"):
        built.write(tmp_path / "png", png=True)
    assert built.write(tmp_path / "auto", overwrite=True)["png"] == []  # auto: no Chromium, no PNG
    with pytest.raises(TypeError, match="`png` must be True, False or None"):
        built.write(tmp_path / "x", png="yes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        built.write(tmp_path / "file", png=False)


def test_a_folder_is_written_only_when_new_empty_or_an_earlier_report_with_overwrite(tmp_path, built):
    out = tmp_path / "out"
    built.write(out, png=False)
    with pytest.raises(ValueError, match=r"holds an earlier report; pass `overwrite` to replace it"):
        built.write(out, png=False)
    (out / "figures" / "stale.png").write_bytes(b"an older report's figure")
    written = built.write(out, png=False, overwrite=True)
    assert not (out / "figures" / "stale.png").exists()  # nothing of the old report stays beside the new one
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        [Path(p).name for p in written["html"]] + ["plotly.min.js"])
    # a user's file is never replaced, with overwrite or without
    (out / "notes.md").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds files that are not a dfsviz report's \(notes.md\): they are kept"):
            built.write(out, png=False, overwrite=overwrite)
    assert (out / "notes.md").read_text() == "mine" and (out / "report.md").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    built.write(empty, png=False)


@pytest.mark.skipif(not report_mod.png_export_available(), reason="PNG export needs kaleido and Chromium")
def test_png_export(tmp_path, built):
    small = ClaimsReport(data=built.data, figures={"schedule": built.figures["schedule"]})
    written = small.write(tmp_path, png=True)
    png = Path(written["png"][0])
    assert png.name == "schedule.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(token_capture, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", token_capture, "--out", str(tmp_path / "r"), "--no-png", "--budgets", "0.25",
                                  "--no-bound1"])
    assert result.exit_code == 0, result.output
    assert "bound violations: 0 of" in result.output and "(PASS)" in result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["config"]["budgets"] == [0.25]
    w_k = next(row for row in data["order_comparison"]["rows"] if row["factor"] == "W_k")
    assert f"W_k: raster {w_k['base_mean']:.3f} -> hilbert3d {w_k['other_mean']:.3f}" in result.output
    first = data["recall"][0]
    assert f"recall {first['method']} · {first['order']}: {first['recall']['0.25']:.3f} @ 0.25" in result.output
    tile = data["tile_size"]["verdict"]
    assert f"tile size: {tile['verdict']} ({tile['reason']})" in result.output
    assert "ordering ablation, recall: not measurable (the capture lacks the orders" in result.output
    assert f"recall across steps, dfs_tile: {data['step_trend']['methods']['dfs_tile']['verdict']['verdict']}" in result.output
    assert "text blocks: not measurable (the model (TokenModel) has no text tokens" in result.output
    bad = runner.invoke(main, ["report", token_capture, "--out", str(tmp_path / "b"), "--budgets", "0.1,x"])
    assert bad.exit_code == 2 and "`--budgets` must be comma-separated fractions" in bad.output
    empty = runner.invoke(main, ["report", token_capture, "--out", str(tmp_path / "e"), "--targets", ","])
    assert empty.exit_code == 2 and "`--targets` must list at least one fraction" in empty.output
    missing = runner.invoke(main, ["report", str(tmp_path / "none.h5"), "--out", str(tmp_path / "m")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    # an --out that cannot be created is refused before the report is built
    under_a_file = str(tmp_path / "r" / "report.json" / "again")
    refused = runner.invoke(main, ["report", token_capture, "--out", under_a_file, "--no-png"])
    assert refused.exit_code == 2 and refused.output == (
        f"Error: `--out` {under_a_file!r} cannot be created: {str(tmp_path / 'r' / 'report.json')!r} is a file\n")
    help_ = runner.invoke(main, ["report", "--help"])
    assert help_.exit_code == 0 and "dfsviz report runs/wan.h5 --out runs/wan-report" in help_.output


def run_dfsviz(*args: str) -> subprocess.CompletedProcess:
    """The `dfsviz` console command (its entry point, dfsviz.cli:main) in a fresh process."""
    return subprocess.run([sys.executable, "-c", "from dfsviz.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_on_the_shipped_sample(tmp_path):
    """`dfsviz report` on the shipped sample, whose Q/K/V are stored at one step only: exit 0,
    Bound 1 checked at that step, Markdown, strict JSON and one HTML page per figure (and a PNG
    per figure when kaleido and Chromium are found, the command's default)."""
    sample = dfsviz.sample_capture()
    out = tmp_path / "report"
    result = run_dfsviz("report", str(sample), "--out", str(out))
    assert result.returncode == 0, result.stderr
    with open_capture(sample) as r:
        qkv_steps = [s for s in r.steps if s in r.layout.qkv_steps]
        assert qkv_steps and qkv_steps != r.steps  # Q/K/V at some steps only: the case that failed
        rows = len(qkv_steps) * len(r.layout.qkv_layers) * len(r.orders) * len(r.heads) * r.grid.num_tokens
        block_rows = len(r.orders) * len(r.methods) * 3 * len(r.steps) * len(r.layers) * len(r.heads) * r.layout.num_blocks
    data = json.loads((out / "report.json").read_text())
    b1 = data["bound1"]
    assert b1["steps"] == qkv_steps and b1["rows"] == rows and b1["violations"] == 0
    assert data["violations"]["rows"] == block_rows and data["violations"]["bound2"] == data["violations"]["bound3"] == 0
    assert f"bound violations: 0 of {block_rows} rows (PASS)" in result.stdout
    assert f"bound 1: 0 violations over {rows} query rows" in result.stdout
    md = (out / "report.md").read_text()
    assert f"at steps {qkv_steps}" in md and "**0 violations**" in md
    html = sorted(p.stem for p in (out / "figures").glob("*.html"))
    assert {"recall_budget", "bound_vs_measured", "mask_raster", "mask_hilbert3d", "schedule", "footprint"} <= set(html)
    assert all(f"(figures/{name}.html)" in md for name in html)
    pngs = sorted((out / "figures").glob("*.png"))
    if report_mod.png_export_available():
        assert [p.stem for p in pngs] == html
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    else:
        assert pngs == []


def scaled_copy(src: str, dst: Path, step: int, at: str) -> Path:
    """A copy of capture ``src`` whose block mass m of ``step`` is doubled in one map: the first
    (layer, branch, order, head) or the last one ("first" / "last"), so that map's rows sum to 2."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        m = f["steps"][step_key(step)]["m"]
        index = (0, 0, 0, 0) if at == "first" else tuple(n - 1 for n in m.shape[:4])
        m[index] = 2 * m[index]
    return dst


def test_a_file_that_fails_validation_is_refused(token_capture, tmp_path):
    bad = scaled_copy(token_capture, tmp_path / "scaled.h5", 2, "first")
    with pytest.raises(ValueError, match=r"fails validation: step_0002/m\b.*no report is built from it"):
        build_report(bad)
    with open_capture(bad) as reader, pytest.raises(ValueError, match="fails validation: step_0002/m"):
        build_report(reader)
    result = run_dfsviz("report", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: capture") and "step_0002/m" in lines[0], result.stderr
    assert f"dfsviz inspect {bad}" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_later_damaged_map_is_refused(token_capture, tmp_path):
    bad = scaled_copy(token_capture, tmp_path / "scaled-late.h5", 2, "last")
    with pytest.raises(ValueError, match="fails validation"):
        build_report(bad)


def test_errors(token_capture):
    with pytest.raises(ValueError, match="`budgets` must be a non-empty tuple"):
        ReportConfig(budgets=())
    with pytest.raises(ValueError, match=r"`targets` must hold fractions in \(0, 1\]"):
        ReportConfig(targets=(0.9, 1.2))
    with pytest.raises(ValueError, match=r"`atol` must be a tolerance in \[0, 1\)"):
        ReportConfig(atol=-1.0)
    with pytest.raises(TypeError, match="`schedule` must be a DFSSchedule or None"):
        ReportConfig(schedule="dfs")
    with pytest.raises(TypeError, match="`method` must be a str or None"):
        ReportConfig(method=1)
    with pytest.raises(ValueError, match="`max_points` must be an integer >= 100"):
        ReportConfig(max_points=5)
    with pytest.raises(ValueError, match="`branch` must be 'cond' or 'uncond'"):
        ReportConfig(branch="both")
    with pytest.raises(TypeError, match="`bound1` must be a bool"):
        ReportConfig(bound1="yes")
    with pytest.raises(TypeError, match="`config` must be a ReportConfig"):
        build_report(token_capture, {"budgets": (0.1,)})
    with pytest.raises(TypeError, match="`capture` must be a file path or a CaptureReader"):
        build_report(3)
    with pytest.raises(ValueError, match=r"`method` must be one of the capture's methods \['meanpool'"):
        build_report(token_capture, ReportConfig(method="oracle"))
    with pytest.raises(ValueError, match=r"`branch` must be one of the capture's branches \['cond'\]"):
        build_report(token_capture, ReportConfig(branch="uncond"))
    with pytest.raises(ValueError, match=r"`order` must be one of the capture's orders \['raster', 'hilbert3d'\]"):
        build_report(token_capture, ReportConfig(order="morton3d"))
    with pytest.raises(ValueError, match="`num_steps` must be a positive integer"):
        default_schedule(0)


def test_captures_without_steps_or_methods(token_capture, tmp_path):
    """Files the capture writer leaves when a run dies before its first step."""
    with open_capture(token_capture) as r:
        layout, config = r.layout, r.config
        perms = {o: r.perm(o) for o in r.orders}
    for name, lay, message in (("empty.h5", layout, "holds no completed step"),
                               ("nomethods.h5", dataclasses.replace(layout, methods=()), "holds no scoring method")):
        CaptureWriter.create(tmp_path / name, lay, {"capture_config": json.dumps(config)}, perms).close()
        with pytest.raises(ValueError, match=message):
            build_report(tmp_path / name)


def test_custom_schedule_with_a_dense_layer(token_capture):
    """Layer 0 dense: its replayed recall is 1 at every step, so the mean is (1 + layer 1) / 2."""
    sched = DFSSchedule(num_steps=10, skip_steps=2, interval=2, dense_layers=(0,))
    rep = build_report(token_capture, ReportConfig(schedule=sched, budgets=(0.2,), bound1=False)).data["drift"]["replay"]
    assert rep["mask_step"] == [None, 2, 2, 6, 6]
    with open_capture(token_capture) as r:
        n, b = r.grid.num_tokens, r.block
        layer1 = float(block_recall(r.block_stats(3, 1, "hilbert3d").m, select_topk(
            r.scores(2, 1, "hilbert3d", "dfs_tile"), sched.at_step(2).gamma, seq_len=n, block=b)).mean())
    assert rep["recall_cached"][2] == pytest.approx((1.0 + layer1) / 2, abs=1e-6)


def test_report_on_structured_attention_finds_the_hilbert_advantage(token_capture):
    """Token-model capture with moving regions: the report's comparison has the right sign and pairing."""
    data = build_report(token_capture, ReportConfig(bound1=False)).data
    assert data["violations"]["bound2"] == data["violations"]["bound3"] == 0
    rows = {row["factor"]: row for row in data["order_comparison"]["rows"]}
    for factor in ("W_q", "W_k"):
        assert rows[factor]["relative_change"] < -0.15, rows[factor]
        assert rows[factor]["other_lower"] == rows[factor]["pairs"] == 6 * 2 * 2
    recall = {(r["method"], r["order"]): r["recall"]["0.2"] for r in data["recall"]}
    assert recall[("dfs_tile", "hilbert3d")] > recall[("dfs_tile", "raster")] + 0.05
    oracle = {o["order"]: o["recall"]["0.2"] for o in data["oracle"]}
    assert oracle["hilbert3d"] >= recall[("dfs_tile", "hilbert3d")]


def test_full_budget_leaves_the_gap_undefined(token_capture):
    """gamma = 1 keeps every block: Delta is +inf everywhere, so its comparison is empty, not an error."""
    data = build_report(token_capture, ReportConfig(budgets=(1.0,), method="meanpool", bound1=False)).data
    rows = {row["factor"]: row for row in data["order_comparison"]["rows"]}
    assert rows["gap"]["pairs"] == 0 and "infinite" in rows["gap"]["reason"]
    assert rows["W_k"]["pairs"] == 24
    assert all(r["recall"]["1"] == pytest.approx(1.0, abs=1e-5) for r in data["recall"])
    assert "| inter-block gap Δ | n/a | n/a | n/a | — | 0 of 0 pairs |" in build_report(
        token_capture, ReportConfig(budgets=(1.0,), bound1=False)).markdown()


# The report module as it was before issue 16 split its building and rendering by claim. Its
# output on the same captures is the reference that the refactored module must reproduce.
_REFERENCE_COMMIT = "f863311d718e807267dbe5725cd9cbe8b9cddf48"


@pytest.fixture(scope="module")
def reference_module():
    # the reference opened captures through dfsviz.capture.store, since split into writer and reader
    return module_at_commit("dfsviz/analysis/report.py", _REFERENCE_COMMIT, "dfsviz_report_reference",
                            lambda source: source.replace("from dfsviz.capture.store import",
                                                          "from dfsviz.capture.reader import"))


#: Sections the report gained after the reference (issue 20): the paper's further claims.
_NEW_SECTIONS = ("order_ablation", "tile_size", "step_trend", "text_blocks")


@pytest.mark.parametrize("capture", ["sample", "token"])
def test_output_equals_the_pre_refactor_report(reference_module, token_capture, capture):
    """JSON, Markdown, notes and every figure of the report equal those of the pre-refactor module,
    apart from the sections added since (5-8, between section 4 and the figure list)."""
    path = str(dfsviz.sample_capture()) if capture == "sample" else token_capture
    expected = reference_module.build_report(path)
    got = build_report(path)
    data = json.loads(json.dumps(report_mod._json_ready(got.data)))
    assert set(_NEW_SECTIONS) <= set(data)
    # JSON objects are unordered: "factor_summary" now follows "order_comparison", the claim that makes it.
    assert {k: v for k, v in data.items() if k not in _NEW_SECTIONS} == json.loads(
        json.dumps(reference_module._json_ready(expected.data)))
    markdown = got.markdown()
    added = markdown[markdown.index("## 5. "):markdown.index("## Figures")]
    assert [line for line in added.splitlines() if line.startswith("## ")] == [
        "## 5. Ordering ablation", "## 6. Tile size of dfs_tile", "## 7. Recall across denoising steps",
        "## 8. Text blocks"]
    assert markdown.replace(added, "") == expected.markdown()
    assert got.notes == expected.notes
    assert list(got.figures) == list(expected.figures)
    for name, fig in expected.figures.items():
        assert got.figures[name].to_json() == fig.to_json(), name
