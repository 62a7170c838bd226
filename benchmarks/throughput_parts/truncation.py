"""The vision encoder over all its layers (the stock forward) against up to the deepest one the decoder reads."""

from __future__ import annotations

import torch

from .common import Arch, row, time_side_by_side
from .plans import Plan


def measure_truncation(arch: Arch, plan: Plan, log) -> list[dict]:
    """Vision-encoder forward over all layers (as the stock forward runs it) vs up to the deepest layer
    the decoder reads (as ours runs it), at inference."""
    from clipseg_bench.model.families import family_of
    from clipseg_bench.model.forward import encode_images

    model = arch.model.eval()
    vm = model.clip.vision_model
    pv = torch.randn(plan.trunc_batch, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def all_layers() -> None:
        vm(pv, output_hidden_states=True, interpolate_pos_encoding=True)

    @torch.no_grad()
    def truncated() -> None:
        encode_images(model, pv)

    depth, total = family_of(model).vision_depth(model), len(vm.encoder.layers)
    log(
        f"  {arch.name} vision truncation: {depth} of {total} layers, {plan.trunc_batch} image(s), "
        f"{plan.trunc_reps} reps"
    )
    t = time_side_by_side({"all": all_layers, "truncated": truncated}, reps=plan.trunc_reps)
    note = f"{plan.trunc_batch} image(s), no masks"
    return [
        row(arch.name, "-", f"vision encoder, all {total} layers", None, min(t["all"]), ratio=1.0, note=note),
        row(
            arch.name,
            "-",
            f"vision encoder, first {depth} layers",
            None,
            min(t["truncated"]),
            ratio=min(t["all"]) / min(t["truncated"]),
            note=f"{note}; at most {total / depth:.2f}x",
        ),
    ]
