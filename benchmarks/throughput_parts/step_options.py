"""Options of the engine step that trade speed for memory or compile time: gradient checkpointing and
``torch.compile`` (``full``, tiny architecture; the real one's checkpointing memory is in the probe)."""

from __future__ import annotations

from .common import Arch, row, time_once, time_side_by_side
from .engine import EngineRun
from .plans import Plan


def measure_gradient_checkpointing(
    arch: Arch, data, plan: Plan, engine: EngineRun, t_plain: float, log
) -> list:
    """Step time of ``full`` with encoder gradient checkpointing, against the plain engine step."""
    from clipseg_bench.model.forward import set_gradient_checkpointing

    log(f"  {arch.name} full + gradient checkpointing")
    set_gradient_checkpointing(arch.model, True)
    try:
        t = time_side_by_side({"gc": engine.step}, reps=plan.heavy_reps)["gc"]
    finally:
        set_gradient_checkpointing(arch.model, False)
    return [
        row(
            arch.name,
            "full",
            "engine + gradient checkpointing",
            engine.last_masks,
            min(t),
            ratio=t_plain / min(t),
            note="ratio: speed vs the engine without it",
        )
    ]


def measure_compile(arch: Arch, data, plan: Plan, t_plain: float, log) -> list[dict]:
    """Step time of ``full`` with the engine's module under ``torch.compile`` (the first step compiles).

    This is what ``train --set compile=true`` does.
    """
    log(f"  {arch.name} full + torch.compile")
    run = EngineRun(arch, data, strategy="full", batch=plan.enc_batch, use_cache=False, compile=True)
    try:
        compile_s = time_once(run.step)
        t = time_side_by_side({"compiled": run.step}, reps=plan.heavy_reps)["compiled"]
    except Exception as exc:  # inductor needs a working C++ toolchain: report, do not abort the benchmark
        return [
            row(arch.name, "full", "engine + torch.compile", None, float("nan"), note=f"failed: {exc!r}"[:90])
        ]
    return [
        row(
            arch.name,
            "full",
            "engine + torch.compile",
            run.last_masks,
            min(t),
            ratio=t_plain / min(t),
            note=f"ratio: speed vs eager; compiling took {compile_s:.0f} s",
        )
    ]
