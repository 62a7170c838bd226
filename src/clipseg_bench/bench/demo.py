"""`clipseg-bench demo` (`make demo`): the whole study at smoke scale, with nothing downloaded.

phantoms (style A) -> prepare -> pretrain a tiny CLIPSeg on A   (stands in for CLIP's pretraining)
phantoms (style B) -> prepare -> benchmark all strategies from that checkpoint -> report

Style B shifts contrast, noise and organ shapes, so fine-tuning has a real domain gap to close and
zero-shot has a real handicap. Every stage writes files and is skipped when its files exist, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from clipseg_bench.bench.matrix import raise_failed, run_matrix
from clipseg_bench.bench.report import write_report
from clipseg_bench.config import load_config
from clipseg_bench.strategies import available

# Learning rates for a tiny model trained from scratch on phantoms: far higher than the real-model
# defaults in configs/strategies.yaml (1e-5 for full fine-tuning of pretrained CLIP).
DEMO_LRS = {"full": 3e-4, "decoder": 1e-3, "adapter": 1e-3, "lora": 1e-3, "bitfit": 1e-3}
SIZES = {  # (cases A, cases B, pretrain steps, fine-tune steps, seeds)
    "full": (8, 8, 1500, 300, [0]),
    "quick": (4, 4, 60, 10, [0]),
}


def _stage(name: str) -> float:
    print(f"\n=== demo: {name}", flush=True)
    return time.perf_counter()


def run_demo(*, out: Path, quick: bool = False, strategies: list[str] | None = None) -> Path:
    """Run the demo into ``out``; returns the report path."""
    from clipseg_bench.data.phantom import write_phantoms
    from clipseg_bench.data.prepare import prepare

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_a, n_b, pre_steps, ft_steps, seeds = SIZES["quick" if quick else "full"]
    t_start = time.perf_counter()
    # One thread: a 250k-parameter model gains little from a second core, and OpenMP threads that
    # spin-wait slow training by 10x or more whenever anything else on the machine wants a core.
    common = {"image_size": 128, "batch_size": 8, "warmup_steps": 20, "weight_decay": 1e-4, "threads": 1}

    _stage("phantoms and prepare")
    for style, n, seed in (("A", n_a, 100), ("B", n_b, 200)):
        if not (out / f"prepared_{style}" / "dataset.json").is_file():
            write_phantoms(out / f"phantoms_{style}", cases=n, seed=seed, style=style, size=96)
            prepare(
                images=out / f"phantoms_{style}" / "images",
                labels=out / f"phantoms_{style}" / "labels",
                out=out / f"prepared_{style}",
                val_fraction=0.25,
                seed=0,
                png=False,
            )

    pretrained = out / "pretrained-tiny"
    if not (pretrained / "config.json").is_file():
        _stage(f"pretrain the tiny CLIPSeg on style A ({pre_steps} steps)")
        _pretrain(out, pretrained, steps=pre_steps, common=common)

    _stage(f"benchmark on style B ({ft_steps} steps per strategy)")
    results = run_matrix(
        data=out / "prepared_B",
        model=str(pretrained),
        strategies=strategies or available(),
        seeds=seeds,
        epochs=1000,
        max_steps=ft_steps,
        out=out / "bench",
        strategy_lr=DEMO_LRS,
        extra={**common, "val_every": 0},
    )

    _stage("report")
    html = write_report([out / "bench"])
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    print(f"report: {html}")
    print(f"table:  {out / 'bench' / 'results.md'}")
    raise_failed(results, out / "bench")  # the report lists them; the exit code must say so too
    return html


def _pretrain(out: Path, pretrained: Path, *, steps: int, common: dict) -> None:
    """Train every parameter of a fresh tiny model on style A, then save it as a local model folder."""
    from clipseg_bench.evaluation.loading import load_run
    from clipseg_bench.model.load import save_model
    from clipseg_bench.train.loop import train

    run = out / "pretrain-run"
    cfg = load_config(
        None,
        {
            **common,
            "data": str(out / "prepared_A"),
            "out": str(run),
            "model": "tiny",
            "strategy": "full",
            "lr": 1e-3,
            "epochs": 1000,
            "max_steps": steps,
            "val_every": 0,
        },
    )
    finished = (run / "run.json").is_file() and '"finished"' in (run / "run.json").read_text()
    if not finished:
        train(cfg, resume=(run / "run.json").is_file())
    save_model(load_run(run).loaded, pretrained)
