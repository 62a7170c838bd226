"""The report's clean-up gain table: score after lcc minus score as predicted, per strategy and organ."""

from __future__ import annotations

import json
import statistics

import pytest
from test_report import make_bench

from clipseg_bench.organs import ORGANS
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import cleanup_gain_table, read_bench


def _add_postprocess_3d(run, shift: float) -> None:
    """metrics.json gains postprocess_3d: none = its summary, lcc = per organ + shift * (organ id)."""
    path = run / "metrics.json"
    m = json.loads(path.read_text())
    lcc_organs = {
        o.key: {k: v + shift * o.id for k, v in m["summary"]["per_organ"][o.key].items()} for o in ORGANS
    }
    lcc = {"dsc": m["summary"]["dsc"] + shift, "nsd": m["summary"]["nsd"] - shift, "per_organ": lcc_organs}
    m["postprocess_3d"] = {"none": {"summary": m["summary"]}, "lcc": {"summary": lcc}}
    path.write_text(json.dumps(m))


@pytest.fixture
def bench(tmp_path):
    b = make_bench(tmp_path / "B", strategies=("zeroshot", "full"), seeds=(0, 1, 2))
    for i, run in enumerate(sorted((b / "runs").iterdir())):
        if run.name != "full-s2":  # one run evaluated before postprocess_3d existed: left out
            _add_postprocess_3d(run, 0.001 * (i + 1))
    return b


def test_gain_is_lcc_minus_none_averaged_over_seeds(bench):
    runs = read_bench([bench])
    dsc = cleanup_gain_table(runs, "dsc").set_index(["strategy", "organ"])
    shifts = {r.name: 0.001 * (i + 1) for i, r in enumerate(sorted((bench / "runs").iterdir()))}
    for strategy in ("zeroshot", "full"):
        used = [v for k, v in shifts.items() if k.startswith(strategy) and k != "full-s2"]
        liver, spleen = dsc.loc[(strategy, "liver")], dsc.loc[(strategy, "spleen")]
        assert liver["mean"] == pytest.approx(statistics.mean(used))  # liver id 1
        assert spleen["mean"] == pytest.approx(3 * statistics.mean(used))  # spleen id 3
        assert liver["std"] == pytest.approx(statistics.stdev(used))
        assert liver["n"] == len(used)
        assert dsc.loc[(strategy, "mean")]["mean"] == pytest.approx(statistics.mean(used))
    nsd = cleanup_gain_table(runs, "nsd").set_index(["strategy", "organ"])
    assert nsd.loc[("zeroshot", "mean")]["mean"] < 0  # a loss shows as a negative gain


def test_report_shows_the_gain_tables_only_when_there_are_scores(bench, tmp_path):
    html = write_report([bench]).read_text()
    md = (bench / "results.md").read_text()
    assert "3D clean-up" in html and "Val NSD gain" in html and "+0.002" in md
    plain = make_bench(tmp_path / "plain", strategies=("full",), seeds=(0,))
    assert cleanup_gain_table(read_bench([plain]), "dsc").empty
    assert "3D clean-up" not in write_report([plain]).read_text()
