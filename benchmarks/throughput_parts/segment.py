"""Segmenting a volume for all 13 organs at inference: the stock forward per pair against ``Segmenter``."""

from __future__ import annotations

import numpy as np
import torch

from .common import Arch, row, time_side_by_side
from .plans import K, Plan


def measure_segment(arch: Arch, data, plan: Plan, log) -> list[dict]:
    """Segment a volume for all 13 organs at inference, from uint8 slices to probabilities.

    Stock: per slice, the stock forward on the slice repeated 13 times with the 13 prompts, then
    sigmoid and resize to the slice's size. Ours: ``evaluation.predict.Segmenter``, one encoding per
    slice; building it (it embeds the prompts) is inside the timed region.
    """
    import torch.nn.functional as F

    from clipseg_bench.evaluation.predict import Segmenter
    from clipseg_bench.model.forward import preprocess
    from clipseg_bench.organs import ORGANS, prompts

    model = arch.model.eval()
    case = data.cases("val")[0]
    volume = np.array(data.array(case, "image")[: plan.segment_slices])
    ids, mask = arch.tokens["input_ids"], arch.tokens["attention_mask"]

    @torch.no_grad()
    def stock(n_slices: int = plan.stock_segment_slices, n_prompts: int = K) -> None:
        for img in torch.from_numpy(volume[:n_slices]):
            pv = preprocess(img[None], size=arch.size, mean=arch.mean, std=arch.std).expand(
                n_prompts, -1, -1, -1
            )
            logits = model(input_ids=ids[:n_prompts], pixel_values=pv, attention_mask=mask[:n_prompts]).logits
            logits = logits.reshape(n_prompts, 1, *pv.shape[-2:])
            torch.sigmoid(F.interpolate(logits, size=img.shape, mode="bilinear", align_corners=False))

    def ours(n_slices: int = plan.segment_slices) -> None:
        seg = Segmenter(
            model,
            arch.tokenizer,
            organs=list(ORGANS),
            prompts=prompts("name"),
            size=arch.size,
            mean=arch.mean,
            std=arch.std,
            device="cpu",
        )
        for _ in seg.iter_probabilities(volume[:n_slices], batch_size=16):
            pass

    n_stock, n_ours = min(plan.stock_segment_slices, len(volume)), len(volume)
    log(f"  {arch.name} segment: stock {n_stock} slice(s) vs Segmenter {n_ours} slices, x {K} organs")
    warm = {
        "stock": lambda: stock(1, 2),
        "ours": lambda: ours(1),
    }  # the same code paths, a fraction of the work
    t = time_side_by_side({"stock": stock, "ours": ours}, reps=plan.heavy_reps, warmup=warm)
    base = row(
        arch.name,
        "zeroshot",
        "segment: stock forward per pair",
        n_stock * K,
        min(t["stock"]),
        ratio=1.0,
        note=f"{n_stock} slice(s) x {K} organs",
    )
    mine = row(
        arch.name,
        "zeroshot",
        "segment: Segmenter",
        n_ours * K,
        min(t["ours"]),
        note=f"{n_ours} slices x {K} organs, {volume.shape[1]} px",
    )
    mine["ratio"] = mine["masks_per_s"] / base["masks_per_s"]
    return [base, mine]
