"""The validation sample: capped validation scores slices spread over every case and along z."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from clipseg_bench.config import load_config
from clipseg_bench.evaluation.validation import even_sample
from clipseg_bench.train.loop import train


def _rows(sizes: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"case": c, "z": 100 + z} for c, n in sizes.items() for z in range(n)]
    )  # (case, z) order, as PreparedData.slices gives them


def test_the_cap_is_shared_by_every_case_and_spread_along_z():
    rows = _rows({"a": 40, "b": 40, "c": 40})
    picked = rows.iloc[even_sample(rows, 12)]
    assert picked.groupby("case").size().to_dict() == {"a": 4, "b": 4, "c": 4}
    assert picked[picked["case"] == "a"]["z"].tolist() == [105, 115, 125, 135]  # stratum centres


def test_a_small_case_gives_its_unused_share_to_the_others():
    rows = _rows({"a": 2, "b": 30, "c": 30})
    counts = rows.iloc[even_sample(rows, 12)].groupby("case").size().to_dict()
    assert counts == {"a": 2, "b": 5, "c": 5}
    # never more than asked, never a slice twice, the whole set when the cap is not binding
    for cap in range(1, 63):
        pos = even_sample(rows, cap)
        assert len(pos) == min(cap, len(rows)) and len(set(pos)) == len(pos)
    assert np.array_equal(even_sample(rows, None), np.arange(len(rows)))


def test_runs_record_and_share_the_validation_sample(prepared_dir, tmp_path):
    """Two runs score the same val slices, all val cases take part, and run.json lists them."""
    samples = []
    for strategy in ("decoder", "bitfit"):
        cfg = load_config(
            None,
            {
                "data": str(prepared_dir),
                "out": str(tmp_path / strategy),
                "strategy": strategy,
                "image_size": 64,
                "max_steps": 1,
                "val_max_slices": 10,
                "threads": 1,
            },
        )
        info = json.loads((train(cfg) / "run.json").read_text())
        samples.append(info["validation"])
    assert samples[0] == samples[1]
    val = samples[0]["val"]
    assert val["slices"] == 10 and val["of"] > 10
    zs = [z for zlist in val["z"].values() for z in zlist]
    assert len(zs) == 10 and max(zs) - min(zs) > val["of"] // 2  # spread along z, not the lowest 10
