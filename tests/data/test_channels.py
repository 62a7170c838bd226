"""input_channels: what CLIPSeg's R, G, B hold, from the prepared caches (issue 14)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clipseg_bench.data.channels import WINDOWS, channel_images, hu_slices, neighbor_indices
from clipseg_bench.data.dataset import PreparedData, SliceDataset
from clipseg_bench.data.io import read_volume
from clipseg_bench.data.volumes import volume_to_slices
from clipseg_bench.errors import InputError
from clipseg_bench.model.forward import preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_neighbors_are_z_minus_1_z_z_plus_1_with_edges_repeated():
    gray = np.arange(5, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8)  # slice z is all z
    out = channel_images([0, 2, 4], mode="neighbors", gray=gray)
    assert out.shape == (3, 3, 2, 3) and out.dtype == np.uint8
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 3], [3, 4, 4]]
    assert neighbor_indices(np.array([0]), 1).tolist() == [[0, 0, 0]]  # a one-slice volume


def test_windows_hand_computed_values():
    # R 40/400 -> [-160, 240], G 80/150 -> [5, 155], B 0/1000 -> [-500, 500]; 255 * (hu - lo) / width, rounded.
    hu = np.array([-1000, -100, 2, 62, 101, 210, 600], dtype=np.int16)[None, None, :]
    out = channel_images([0], mode="windows", gray=np.zeros((1, 1, 7), np.uint8), hu=hu)[0, :, 0]
    assert out[0].tolist() == [0, 38, 103, 142, 166, 236, 255]
    assert out[1].tolist() == [0, 0, 0, 97, 163, 255, 255]
    assert out[2].tolist() == [0, 102, 128, 143, 153, 181, 255]
    assert [(w["level"], w["width"]) for w in WINDOWS] == [(40, 400), (80, 150), (0, 1000)]


def test_gray_is_the_cached_slice_and_windows_need_hu():
    gray = np.random.default_rng(0).integers(0, 256, (4, 3, 3), dtype=np.uint8)
    assert np.array_equal(channel_images([1, 3], mode="gray", gray=gray), gray[[1, 3]])
    with pytest.raises(ValueError, match="HU"):
        channel_images([0], mode="windows", gray=gray)
    with pytest.raises(ValueError, match="unknown"):
        channel_images([0], mode="rgb", gray=gray)


def test_hu_slices_round_and_clip_to_int16():
    out = hu_slices(np.array([-1024.4, 0.6, 40000.0, -40000.0]))
    assert out.dtype == np.int16 and out.tolist() == [-1024, 1, 32767, -32768]


def test_prepare_keeps_the_hu_slices(prepared_dir, phantom_dir):
    data = PreparedData(prepared_dir)
    assert data.meta["hu_cache"] is True
    case = data.cases("train")[0]
    volume, affine, _ = read_volume(phantom_dir / "images" / f"{case}_0000.nii.gz")
    hu = data.array(case, "hu")
    assert hu.dtype == np.int16 and np.array_equal(hu, volume_to_slices(volume, affine)[0])
    data.check_channels("windows")  # no error


def test_a_folder_prepared_without_hu_refuses_windows_only(prepared_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared_dir, old, ignore=shutil.ignore_patterns("*_hu.npy", "feature_cache"))
    meta = json.loads((old / "dataset.json").read_text())
    del meta["hu_cache"]
    (old / "dataset.json").write_text(json.dumps(meta))
    data = PreparedData(old)  # still readable: gray and neighbors need only the uint8 cache
    data.check_channels("gray")
    data.check_channels("neighbors")
    with pytest.raises(InputError) as err:
        data.check_channels("windows")
    assert err.value.path == str(old) and "HU cache" in err.value.problem


def test_slice_dataset_serves_neighbors_and_windows(prepared_dir):
    data = PreparedData(prepared_dir)
    rows = data.slices("train", kept_only=False)
    case = rows["case"].iloc[0]
    n = data.cases_meta[case]["n_slices"]
    edge_rows = rows[(rows["case"] == case) & rows["z"].isin([0, 5, n - 1])]
    gray, hu = data.array(case, "image"), data.array(case, "hu")
    size = gray.shape[1]  # the slices' own size: no resize, the exact cached values
    ds = SliceDataset(data, "train", size=size, rows=edge_rows, channels="neighbors")
    for i, z in enumerate(edge_rows["z"]):
        want = np.stack([gray[max(z - 1, 0)], gray[z], gray[min(z + 1, n - 1)]])
        assert np.array_equal(ds[i]["image"].numpy(), want), z
    ds = SliceDataset(data, "train", size=size, rows=edge_rows, channels="windows")
    z = int(edge_rows["z"].iloc[1])
    assert np.array_equal(ds[1]["image"].numpy(), channel_images([z], mode="windows", gray=gray, hu=hu)[0])
    small = SliceDataset(data, "train", size=32, rows=edge_rows, channels="neighbors")
    assert small[0]["image"].shape == (3, 32, 32) and small[0]["image"].dtype == torch.uint8


def test_preprocess_of_three_equal_channels_is_the_gray_preprocess():
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (2, 40, 40), dtype=torch.uint8, generator=g)
    three = gray[:, None].expand(2, 3, 40, 40)
    assert torch.equal(
        preprocess(three, size=32, mean=MEAN, std=STD), preprocess(gray, size=32, mean=MEAN, std=STD)
    )
    rgb = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=g)
    out = preprocess(rgb, size=40, mean=MEAN, std=STD)
    expect = (rgb[:, 1].float() / 255 - MEAN[1]) / STD[1]  # channel G normalised with G's mean/std
    assert torch.allclose(out[:, 1], expect, atol=1e-6)
    with pytest.raises(ValueError):
        preprocess(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), size=8, mean=MEAN, std=STD)
