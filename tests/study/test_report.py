"""`clipseg-bench report` on synthetic BENCH folders: every number traced back to its run files."""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.study.plots import pareto_front
from clipseg_bench.study.report import strategy_description, write_report

REQUIRED = [
    "strategy",
    "seed",
    "trainable_params",
    "train_dice",
    "val_dice",
    "val_dsc3d",
    "val_nsd3d",
    "train_time_s",
    "s_per_epoch",
    "peak_mem_mb",
]
PLOTS = ("pareto", "time_breakdown", "per_organ", "curves", "overlays")
TOTAL = 255_000
TRAINABLE = {"zeroshot": 0, "full": 255_000, "decoder": 61_000, "lora": 9_000}


# --- synthetic run folders --------------------------------------------------------------------


def _samples(n: int = 3, size: int = 48, noise: int = 0) -> dict[str, np.ndarray]:
    """The same n slices for every run: a bright disc (liver), a square (spleen), a blob (left kidney)."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((n, size, size), 40, np.uint8)
    gt = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        liver = (yy - 20) ** 2 + (xx - 16) ** 2 < (8 + i) ** 2
        gt[i][liver] = 1
        gt[i][30:38, 28:36] = 3
        gt[i][(yy - 12) ** 2 + (xx - 36) ** 2 < 16] = 13
        image[i][gt[i] > 0] = 160
    pred = np.roll(gt, noise, axis=2)  # a shifted prediction, different per strategy
    return {"image": image, "gt": gt, "pred": pred, "case": np.array(["case_a"] * n), "z": np.arange(n) * 5}


def make_run(bench: Path, strategy: str, seed: int, status: str = "finished", *, epochs: int = 3) -> Path:
    """Write one run folder with numbers that depend on (strategy, seed) deterministically."""
    rng = np.random.default_rng([zlib.crc32(strategy.encode()), seed])
    run = bench / "runs" / f"{strategy}-s{seed}"
    run.mkdir(parents=True)
    trained = strategy != "zeroshot"
    parts = {
        k: round(float(rng.uniform(0.5, 5.0)), 4) if trained else 0.0
        for k in ("data", "forward", "backward", "optimizer")
    }
    parts["eval"] = round(float(rng.uniform(0.5, 2.0)), 4)
    train_time = round(sum(parts.values()) + 0.3, 4) if trained else 0.0
    info = {
        "status": status,
        "strategy": strategy,
        "seed": seed,
        "model": "tiny",
        "git": {"commit": "abc123def456", "dirty": False},
        "hardware": {"cpu": "test cpu", "gpu": None, "torch": "2.13.0", "cuda": None, "num_processes": 1},
        "params": {"trainable": TRAINABLE[strategy], "total": TOTAL},
        "timing": {
            "train_time_s": train_time,
            "s_per_epoch": round(train_time / epochs, 4) if trained else None,
            "epochs": epochs if trained else 0,
            "steps": 10 * epochs if trained else 0,
            "masks_per_s": round(float(rng.uniform(20, 80)), 3),
            "cache_build_s": 1.25 if strategy == "decoder" else 0.0,
            "cache_size_mb": 3.4,
            "breakdown_s": parts,
            "peak_mem_mb": round(float(rng.uniform(300, 900)), 2),
            "peak_mem_kind": "rss",
        },
        "final": {
            "train_dice": round(float(rng.uniform(0.6, 0.9)), 5) if trained else None,
            "val_dice": round(float(rng.uniform(0.5, 0.8)), 5),
        },
    }
    (run / "run.json").write_text(json.dumps(info))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "data": "/p",
                "out": str(run),
                "model": "tiny",
                "strategy": strategy,
                "seed": seed,
                "epochs": epochs,
                "lr": 1e-3 if strategy != "full" else 1e-5,
                "batch_size": 8,
            }
        )
    )
    if trained:
        ep = np.arange(1, epochs + 1)
        pd.DataFrame(
            {
                "epoch": ep,
                "step": ep * 10,
                "loss": 1.0 / ep,
                "train_dice": 0.5 + 0.1 * ep,
                "val_dice": 0.4 + 0.1 * ep,
                "epoch_time_s": train_time / epochs,
                "lr": 1e-3,
            }
        ).to_csv(run / "history.csv", index=False)
    if status == "finished":
        per_organ = {
            o.key: {
                "dsc": round(float(rng.uniform(0.3, 0.95)), 5),
                "nsd": round(float(rng.uniform(0.3, 0.95)), 5),
            }
            for o in ORGANS
        }
        metrics = {
            "split": "val",
            "dice2d": round(float(rng.uniform(0.5, 0.85)), 5),
            "empty_specificity": 0.95,
            "per_case": {"case_a": per_organ},
            "summary": {  # as evaluation.metrics.summarize makes it from per_case
                "dsc": statistics.fmean(s["dsc"] for s in per_organ.values()),
                "nsd": statistics.fmean(s["nsd"] for s in per_organ.values()),
                "per_organ": per_organ,
            },
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
        noise = list(TRAINABLE).index(strategy)
        np.savez(run / "samples.npz", **_samples(noise=noise))
    return run


def make_bench(bench: Path, strategies=("zeroshot", "full", "decoder"), seeds=(0, 1)) -> Path:
    for s in strategies:
        for seed in seeds:
            make_run(bench, s, seed)
    return bench


# --- reading back what the report wrote -------------------------------------------------------


def md_table(md: str, heading: str) -> pd.DataFrame:
    """The pipe table under `## heading` in results.md, as strings."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in ln.strip().strip("|").split("|")]
        for ln in section.splitlines()
        if ln.startswith("|")
    ]
    return pd.DataFrame(rows[2:], columns=rows[0])  # rows[1] is the |---| rule


def parse_pm(cell: str) -> tuple[float, float | None]:
    """'0.8123 ± 0.0100' -> (0.8123, 0.01); '0.8 ± –' -> (0.8, None)."""
    m, s = cell.split("±")
    return float(m.replace(",", "")), None if s.strip() == "–" else float(s.replace(",", ""))


def source_values(bench: Path, strategy: str, field) -> list[float]:
    """A number from each finished run's own JSON files, via `field(run_json, metrics_json)`."""
    out = []
    for run in sorted((bench / "runs").glob(f"{strategy}-s*")):
        info = json.loads((run / "run.json").read_text())
        if info["status"] != "finished":
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        out.append(field(info, metrics))
    return out


def parse_ci(cell: str) -> tuple[float, float | None, float | None]:
    """'0.8123 [0.8000, 0.8200]' -> (0.8123, 0.8, 0.82); '0.8 [–, –]' -> (0.8, None, None)."""
    mean, rest = cell.split("[")
    low, high = (None if x.strip() == "–" else float(x) for x in rest.strip("]").split(","))
    return float(mean), low, high


def assert_over_cases(cell: str, sd_cell: str, values: list[float], digits: int) -> None:
    """A 'mean [CI]' cell and its 'sd(seeds)' cell against the per-seed values they summarise (the
    fixture's runs have one val case each, so the mean over cases is the mean over seeds)."""
    tol = 0.5 * 10**-digits + 1e-12
    mean, low, high = parse_ci(cell)
    assert abs(mean - statistics.mean(values)) <= tol, (cell, values)
    assert low is None and high is None  # one val case: no interval
    if len(values) == 1:
        assert sd_cell == "–"
    else:
        assert abs(float(sd_cell) - statistics.stdev(values)) <= tol, (sd_cell, values)


def assert_pm(cell: str, values: list[float], digits: int) -> None:
    mean, std = parse_pm(cell)
    tol = 0.5 * 10**-digits + 1e-12
    assert abs(mean - statistics.mean(values)) <= tol, (cell, values)
    if len(values) == 1:
        assert std is None
    else:
        assert abs(std - statistics.stdev(values)) <= tol, (cell, values)


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    b = make_bench(tmp_path_factory.mktemp("bench") / "B")
    make_run(b, "lora", 0, status="running")  # listed, never averaged
    write_report([b])
    return b


def test_writes_every_artefact(bench):
    for name in ("results.csv", "results.md", "report.html", "results_summary.csv"):
        assert (bench / name).stat().st_size > 0, name
    for name in PLOTS:
        with Image.open(bench / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and min(im.size) > 100, name


def test_results_csv_rows_equal_their_source_files(bench):
    table = pd.read_csv(bench / "results.csv")
    assert set(REQUIRED) <= set(table.columns)
    assert len(table) == 7  # 3 strategies x 2 seeds + the running lora run
    assert list(table["strategy"]) == ["zeroshot", "zeroshot", "full", "full", "decoder", "decoder", "lora"]
    for row in table.itertuples():
        run = Path(row.bench_dir) / row.run_dir
        info = json.loads((run / "run.json").read_text())
        assert (row.strategy, row.seed, row.status) == (info["strategy"], info["seed"], info["status"])
        assert row.trainable_params == info["params"]["trainable"]
        assert row.train_time_s == info["timing"]["train_time_s"]
        assert row.peak_mem_mb == info["timing"]["peak_mem_mb"]
        assert row.time_forward_s == info["timing"]["breakdown_s"]["forward"]
        train_dice = info["final"]["train_dice"]
        assert (math.isnan(row.train_dice) and train_dice is None) or row.train_dice == train_dice
        if info["status"] == "finished":
            metrics = json.loads((run / "metrics.json").read_text())
            assert row.val_dice == metrics["dice2d"]  # evaluate's number wins over the trainer's
            assert (row.val_dsc3d, row.val_nsd3d) == (metrics["summary"]["dsc"], metrics["summary"]["nsd"])
            assert row.dsc_spleen == metrics["summary"]["per_organ"]["spleen"]["dsc"]
        else:
            assert row.val_dice == info["final"]["val_dice"] and math.isnan(row.val_dsc3d)


def test_results_md_means_and_stds_equal_the_run_json(bench):
    md = (bench / "results.md").read_text()
    table = md_table(md, "Strategies").set_index("Strategy")
    assert list(table.index) == ["zeroshot", "full", "decoder"]  # the running lora run is not averaged
    fields = {
        "Val Dice ± sd(seeds)": (lambda i, m: m["dice2d"], 4),
        "FP slice rate ± sd(seeds)": (lambda i, m: 1 - m["empty_specificity"], 3),  # a run from before it
        "Training time (s) ± sd(seeds)": (lambda i, m: i["timing"]["train_time_s"], 2),
        "Peak memory (MB) ± sd(seeds)": (lambda i, m: i["timing"]["peak_mem_mb"], 1),
    }
    for strategy in table.index:
        for col, (field, digits) in fields.items():
            assert_pm(table.loc[strategy, col], source_values(bench, strategy, field), digits)
        for col, sd, metric in (("Val 3D DSC", "3D DSC", "dsc"), ("Val NSD", "NSD", "nsd")):
            assert_over_cases(
                table.loc[strategy, f"{col} [95% CI over cases]"],
                table.loc[strategy, f"{sd} sd(seeds)"],
                source_values(bench, strategy, lambda i, m, k=metric: m["summary"][k]),
                4,
            )
        assert table.loc[strategy, "Val cases"] == "1"
        if strategy != "zeroshot":
            assert_pm(
                table.loc[strategy, "Train Dice ± sd(seeds)"],
                source_values(bench, strategy, lambda i, m: i["final"]["train_dice"]),
                4,
            )
            assert_pm(
                table.loc[strategy, "s/epoch ± sd(seeds)"],
                source_values(bench, strategy, lambda i, m: i["timing"]["s_per_epoch"]),
                3,
            )
        else:
            assert table.loc[strategy, "Train Dice ± sd(seeds)"] == "–"  # nothing trained, nothing to report
        assert table.loc[strategy, "Trainable params"].startswith(f"{TRAINABLE[strategy]:,}")
    organs = md_table(md, "Per-organ val NSD").set_index("Organ")
    for strategy in ("full", "decoder"):
        for o in ORGANS:
            assert_over_cases(
                organs.loc[o.name, f"{strategy} [95% CI]"],
                organs.loc[o.name, f"{strategy} sd(seeds)"],
                source_values(bench, strategy, lambda i, m, k=o.key: m["summary"]["per_organ"][k]["nsd"]),
                3,
            )


def test_html_shows_the_same_numbers_and_the_unfinished_run(bench):
    page = (bench / "report.html").read_text()
    md = (bench / "results.md").read_text()
    for cell in md_table(md, "Strategies").drop(columns=["Seeds"]).to_numpy().ravel():
        assert f">{cell}<" in page, cell
    assert "excluded from every mean" in page and "lora seed 0 (running)" in page
    assert "0.7527" in page and "Reported by the original study" in page  # the study's own table
    assert "abc123def4" in page and "test cpu" in page  # provenance


def test_two_shards_merge_into_the_same_table(tmp_path):
    whole = make_bench(tmp_path / "whole", strategies=("full", "decoder", "lora"))
    shard1 = make_bench(tmp_path / "s1", strategies=("full", "lora"), seeds=(0, 1))
    shard2 = make_bench(tmp_path / "s2", strategies=("decoder",), seeds=(0, 1))
    make_run(shard2, "full", 1, status="failed")  # a failed retry elsewhere must not replace the finished run
    write_report([whole])
    write_report([shard1, shard2], out=tmp_path / "merged")  # the failed retry comes last
    a = pd.read_csv(whole / "results.csv").drop(columns=["bench_dir"])
    b = pd.read_csv(tmp_path / "merged" / "results.csv").drop(columns=["bench_dir"])
    pd.testing.assert_frame_equal(a, b)
    runs_section = "## Runs"  # only its Folder column differs: it names where each run lives
    merged_md = (tmp_path / "merged" / "results.md").read_text()
    assert merged_md.split(runs_section)[0] == (whole / "results.md").read_text().split(runs_section)[0]
    assert "full seed 1 (failed)" not in merged_md


def test_conflicting_finished_duplicates_name_both_folders(tmp_path):
    a = make_bench(tmp_path / "a", strategies=("full",), seeds=(0,))
    b = make_bench(tmp_path / "b", strategies=("full",), seeds=(0,))
    run_json = b / "runs" / "full-s0" / "run.json"
    info = json.loads(run_json.read_text())
    info["final"]["train_dice"] = 0.123
    run_json.write_text(json.dumps(info))
    with pytest.raises(InputError) as err:
        write_report([a, b])
    assert (
        str(a / "runs" / "full-s0") in err.value.message and str(b / "runs" / "full-s0") in err.value.message
    )


def test_unfinished_run_is_listed_but_not_averaged(tmp_path):
    b = make_bench(tmp_path / "b", strategies=("full",), seeds=(0, 1))
    run = make_run(b, "full", 2, status="interrupted")
    info = json.loads((run / "run.json").read_text())
    info["timing"]["train_time_s"] = 1e6  # would dominate any mean it leaked into
    (run / "run.json").write_text(json.dumps(info))
    write_report([b])
    table = pd.read_csv(b / "results.csv")
    assert list(table["status"]) == ["finished", "finished", "interrupted"]
    summary = pd.read_csv(b / "results_summary.csv").set_index("strategy")
    finished = table[table["status"] == "finished"]["train_time_s"]
    assert summary.loc["full", "n_seeds"] == 2
    assert summary.loc["full", "train_time_s_mean"] == pytest.approx(finished.mean())
    assert summary.loc["full", "train_time_s_std"] == pytest.approx(statistics.stdev(finished))
    assert "full seed 2 (interrupted)" in (b / "results.md").read_text()


def test_a_benchmark_with_nothing_finished_still_reports(tmp_path):
    b = tmp_path / "b"
    make_run(b, "full", 0, status="running")
    page = write_report([b]).read_text()
    assert "No finished runs yet" in page and "full seed 0 (running)" in page
    assert pd.read_csv(b / "results.csv")["status"].tolist() == ["running"]
    assert not list((b / "plots").glob("*.png"))  # nothing finished, nothing to plot


@pytest.mark.parametrize("layout", ["absent", "empty", "no_runs"])
def test_no_runs_is_an_input_error_naming_the_folder(tmp_path, layout):
    b = tmp_path / "bench"
    if layout != "absent":
        b.mkdir()
    if layout == "no_runs":
        (b / "runs").mkdir()
    with pytest.raises(InputError) as err:
        write_report([b])
    assert err.value.path == str(b)


def test_strategy_description_comes_from_the_registry(tmp_path, monkeypatch):
    from clipseg_bench.strategies import get

    monkeypatch.setattr(type(get("decoder")), "description", "Registry text for decoder.")
    b = make_bench(tmp_path / "b", strategies=("decoder",), seeds=(0,))
    page = write_report([b]).read_text()
    assert "Registry text for decoder." in page
    assert "Building the frozen-encoder feature cache took 1.2 s" in page  # explained from run.json


def test_unknown_strategy_has_an_empty_description():
    assert strategy_description("no-such-strategy") == ""  # a run of a strategy this install lacks
    assert strategy_description("decoder")  # the real registry's text


def test_unfinished_runs_are_marked_in_the_html(bench):
    page = (bench / "report.html").read_text()
    red = re.findall(r'<td class="[^"]*\bunfinished\b[^"]*" >([^<]*)</td>', page)
    assert red[:3] == ["lora", "0", "running"] and len(red) == 8  # every cell of that row, no other row
    assert "td.unfinished{color:#a33}" in page


def test_config_values_are_escaped(tmp_path):
    # config.yaml is validated on reading (unknown keys are refused), so markup can only come in values
    b = make_bench(tmp_path / "b", strategies=("full",), seeds=(0, 1))
    for seed, template in ((0, "name"), (1, "<script>{organ}</script>")):
        cfg_path = b / "runs" / f"full-s{seed}" / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg_path.write_text(
            yaml.safe_dump({**cfg, "model": "<script>alert(1)</script>", "prompt_template": template})
        )
    page = write_report([b]).read_text()
    assert "<script" not in page  # a config is shown as text, never run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the shared setting
    assert "&lt;script&gt;{organ}&lt;/script&gt;" in page  # a differing setting's cell


def test_the_template_ships_with_the_package():
    template = resources.files("clipseg_bench.study").joinpath("templates/report.html.j2")
    assert template.is_file()
    # An editable install reads src/ directly, so check the wheel's rule too: package-data must list it.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["clipseg_bench"]
    assert any(fnmatch.fnmatch("study/templates/report.html.j2", g) for g in globs), globs


def test_pareto_front_keeps_only_undominated_points():
    cost = np.array([0.0, 10.0, 5.0, 20.0, 7.0, np.nan])
    quality = np.array([0.3, 0.8, 0.7, 0.75, 0.6, 0.99])
    # 20 s / 0.75 loses to 10 s / 0.8; 7 s / 0.6 loses to 5 s / 0.7; NaN never counts
    assert pareto_front(cost, quality).tolist() == [0, 2, 1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_opens_in_headless_chromium_with_every_image(bench, tmp_path):
    page = (bench / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == len(PLOTS)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and min(im.size) > 0
    assert not re.search(
        r'(src|href)="(https?:)?//|<link|<script|url\(', page
    )  # nothing fetched from outside
    # The browser's own verdict: after load, every <img> is complete and has a natural size.
    probe = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.imgs=i.length+':'+i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>"
    )
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f'data-imgs="{len(PLOTS)}:{len(PLOTS)}"' in dom, dom[-500:]


def _timing_summary(n_seeds: int, backward_sd: float) -> pd.DataFrame:
    """Two trained strategies: 'slow' spends 6 s more in backward and 1 s more in forward."""
    rows = []
    for name, backward, forward in (("fast", 2.0, 3.0), ("slow", 8.0, 4.0)):
        row = {"strategy": name, "n_seeds": n_seeds, "train_time_s_mean": backward + forward + 1.0}
        row.update(train_time_s_std=0.1, s_per_epoch_mean=1.0, s_per_epoch_std=0.0)
        row.update(time_backward_s_mean=backward, time_backward_s_std=backward_sd)
        row.update(time_forward_s_mean=forward, time_forward_s_std=0.1)
        rows.append(row)
    return pd.DataFrame(rows)


def test_the_gap_is_attributed_only_beyond_the_spread_over_seeds():
    from clipseg_bench.study.report import explain_gap

    parts = ["forward", "backward"]
    clear = explain_gap(_timing_summary(3, backward_sd=0.5), parts)
    assert "Per part, slow minus fast: forward +1.0 s, backward +6.0 s." in clear
    assert "Most of the 7.0 s gap is backward time" in clear
    noisy = explain_gap(_timing_summary(3, backward_sd=4.0), parts)  # 6 s within 2 x sqrt(2) x 4 s
    assert "backward +6.0 s" in noisy and "Most of" not in noisy
    single = explain_gap(_timing_summary(1, backward_sd=float("nan")), parts)
    assert "Most of" not in single and "With one seed there is no spread" in single
