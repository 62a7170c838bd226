"""`clipseg-bench demo` (`make demo`): the whole study at smoke scale, with nothing downloaded.

phantoms (style A) -> prepare -> pretrain a tiny CLIPSeg on A   (stands in for CLIP's pretraining)
phantoms (style B) -> prepare --folds 3 -> benchmark all strategies x 3 folds from that checkpoint
                              -> the data-efficiency axis: a few strategies on 1 and 3 of the
                                 training cases, on every fold (the full set comes from the benchmark)
                              -> report (every style-B case scored once, out of fold: strategies,
                                 prompt reliance, data efficiency, paired differences, the clean-up
                                 chosen per organ on those out-of-fold scores)

`demo --families` (`make demo-families`, about 30 minutes on 2 busy cores, so not part of `make demo`)
also pretrains a tiny SAM 3 on style A and benchmarks it beside the tiny CLIPSeg: every strategy of
both models on style B in one report, paired within each model and across the two (no data axis).

Style B shifts contrast, noise and organ shapes, so fine-tuning has a real domain gap to close and
zero-shot has a real handicap. Every stage writes files and is skipped when its files exist, so an
interrupted demo continues where it stopped. Each stage prints its wall and CPU time: with one
thread per run, CPU time is what the stage takes on an idle machine.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipseg_bench.config import load_config
from clipseg_bench.run_folder import RunFolder, RunStatus
from clipseg_bench.strategies import available, display_order, get
from clipseg_bench.study.matrix import raise_failed, run_matrix
from clipseg_bench.study.report import write_report


def demo_lrs(strategies: list[str]) -> dict[str, float]:
    """Each strategy's rate for the demo's tiny model (its file's ``demo_lr``): far higher than the
    real-model defaults (1e-5 for full fine-tuning of pretrained CLIP)."""
    return {s: get(s).demo_lr for s in strategies if get(s).demo_lr is not None}


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. The full size fits `make demo` into 10 minutes on 2 cores (README)."""

    cases_a: int  # phantom cases of style A (pretraining; a quarter of them are val cases)
    cases_b: int  # phantom cases of style B (the benchmark)
    val_fraction_b: float  # of the style-B cases, without folds: the val cases the report scores
    folds_b: int | None  # K folds of the style-B cases: every case is scored once, out of fold
    pretrain_steps: int
    steps: int  # fine-tuning steps of every benchmark run, on any number of training cases
    seeds: list[int]
    # The data-efficiency axis: these strategies also train on these training-case counts.
    axis_strategies: list[str] = field(default_factory=list)
    axis_cases: str = ""
    sam3_pretrain_steps: int = 0  # `demo --families`: the tiny SAM 3's pretraining on style A


SIZES = {
    "full": DemoSize(
        cases_a=8,
        cases_b=10,
        val_fraction_b=0.3,  # without folds, 3 val cases: too few for a verdict (5 needed, 6 to reach p < 0.05)
        folds_b=3,  # folds of 4/3/3 cases: all 10 cases scored out of fold, each run trains on 6-7
        pretrain_steps=1000,
        steps=60,
        seeds=[0],  # one seed x 3 folds: 18 runs; with 10 scored cases the tests over cases can decide
        axis_strategies=["lora"],  # x 2 counts x 3 folds: 6 runs (24 in all; before folds 20)
        axis_cases="1,3",
        sam3_pretrain_steps=1000,
    ),
    "quick": DemoSize(
        cases_a=4,
        cases_b=4,
        val_fraction_b=0.25,
        folds_b=2,
        pretrain_steps=60,
        steps=10,
        seeds=[0],
        axis_strategies=["lora"],
        axis_cases="1",
        sam3_pretrain_steps=20,
    ),
    # The demo's earlier size, which the measurements of benchmarks/cache_dtype.py and
    # benchmarks/levers.py (benchmarks/README.md, README) were made with: they keep using it.
    "study": DemoSize(
        cases_a=8,
        cases_b=8,
        val_fraction_b=0.25,
        folds_b=None,
        pretrain_steps=1500,
        steps=300,
        seeds=[0],
    ),
}

# One thread: a 250k-parameter model gains little from a second core, and OpenMP threads that
# spin-wait slow training by 10x or more whenever anything else on the machine wants a core.
# The warm-up is the default share of each run's steps (warmup_fraction 0.05), as in the real study.
COMMON = {"image_size": 128, "batch_size": 8, "weight_decay": 1e-4, "threads": 1}
# The tiny SAM 3's pretraining (benchmarks/README.md, `sam3_mask_choice.py`: with lr 1e-3 its semantic
# head still predicted nothing at step 300; 2e-3 reached val Dice 0.61 by step 800). Its own input
# side, 112 px (a multiple of its 14 px patches; 128 is not).
SAM3_PRETRAIN = {"model": "sam3-tiny", "image_size": 112, "lr": 2e-3}


class _Stages:
    """Prints each stage's name, then its wall and CPU time (this process and its subprocesses)."""

    def __init__(self):
        self.name, self.t0, self.cpu0 = None, 0.0, 0.0

    @staticmethod
    def _cpu() -> float:
        return sum(
            u.ru_utime + u.ru_stime
            for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )

    def start(self, name: str) -> None:
        self.end()
        print(f"\n=== demo: {name}", flush=True)
        self.name, self.t0, self.cpu0 = name, time.perf_counter(), self._cpu()

    def end(self) -> None:
        if self.name is not None:
            wall, cpu = time.perf_counter() - self.t0, self._cpu() - self.cpu0
            print(f"=== demo: {self.name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        self.name = None


def run_demo(
    *,
    out: Path,
    quick: bool = False,
    strategies: list[str] | None = None,
    lr_sweep: int | None = None,
    families: bool = False,
) -> Path:
    """Run the demo into ``out``; returns the report path.

    Args:
        lr_sweep: choose each strategy's rate first (``benchmark --lr-sweep N`` around its
            ``demo_lr``, on fold 0 and the first seed): N more runs per trained strategy, off by
            default because it does not fit `make demo`'s 10 minutes on 2 cores.
        families: also pretrain a tiny SAM 3 and benchmark both models side by side (no data axis).
    """
    out = Path(out)
    size = SIZES["quick" if quick else "full"]
    t_start = time.perf_counter()
    stages = _Stages()
    pretrained = prepare_demo(out, size=size, stages=stages)
    models = [str(pretrained)]
    if families:
        models.append(str(pretrain_sam3(out, steps=size.sam3_pretrain_steps, stages=stages)))
    strategies = strategies or display_order(available())
    # Several models: each at its own input side (saved with it); one: the demo's 128 px as before.
    common = {k: v for k, v in COMMON.items() if not (families and k == "image_size")}
    matrix = {
        "data": out / "prepared_B",
        "model": models,
        "seeds": size.seeds,
        "epochs": 1000,
        "max_steps": size.steps,
        "strategy_lr": demo_lrs(strategies),
        "extra": {**common, "val_every": 0},
        "folds": "all" if size.folds_b else None,
    }
    stages.start(
        f"benchmark on style B ({size.steps} steps per run, seeds {size.seeds}"
        + (f", {size.folds_b} folds)" if size.folds_b else ")")
    )
    auto = "auto" if size.folds_b else "none"  # the per-organ clean-up, chosen on out-of-fold scores
    outcomes = [
        (
            run_matrix(
                strategies=strategies, out=out / "bench", postprocess=auto, lr_sweep=lr_sweep, **matrix
            ),
            out / "bench",
        )
    ]
    axis = [] if families else [s for s in size.axis_strategies if s in strategies]
    if axis:
        stages.start(f"data efficiency: {', '.join(axis)} on {size.axis_cases} of the training cases")
        results = run_matrix(strategies=axis, out=out / "bench_data", train_cases=size.axis_cases, **matrix)
        outcomes.append((results, out / "bench_data"))
    benches = [bench for _, bench in outcomes]

    stages.start("report")
    html = write_report(benches, out=out / "bench")
    stages.end()
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    print(f"report: {html}")
    print(f"table:  {out / 'bench' / 'results.md'}")
    for results, bench in outcomes:  # the report lists them; the exit code must say so too
        raise_failed(results, bench)
    return html


def prepare_demo(out: Path, *, size: DemoSize, stages: _Stages | None = None) -> Path:
    """The demo's data and base model: phantoms of styles A and B prepared into ``out/prepared_A``
    and ``out/prepared_B``, and the tiny model pretrained on A; each skipped when its files exist.

    Returns:
        The pretrained model's folder (a ``--model`` value).
    """
    from clipseg_bench.data.phantom import write_phantoms
    from clipseg_bench.data.prepare import prepare

    out.mkdir(parents=True, exist_ok=True)
    stages = stages or _Stages()
    stages.start("phantoms and prepare")
    for style, n, seed, val, folds in (
        ("A", size.cases_a, 100, 0.25, None),
        ("B", size.cases_b, 200, size.val_fraction_b, size.folds_b),
    ):
        if not (out / f"prepared_{style}" / "dataset.json").is_file():
            write_phantoms(out / f"phantoms_{style}", cases=n, seed=seed, style=style, size=96)
            prepare(
                images=out / f"phantoms_{style}" / "images",
                labels=out / f"phantoms_{style}" / "labels",
                out=out / f"prepared_{style}",
                val_fraction=val,
                folds=folds,
                seed=0,
                png=False,
            )
    pretrained = out / "pretrained-tiny"
    if not (pretrained / "config.json").is_file():
        stages.start(f"pretrain the tiny CLIPSeg on style A ({size.pretrain_steps} steps)")
        _pretrain(out, pretrained, steps=size.pretrain_steps)
    return pretrained


def pretrain_sam3(out: Path, *, steps: int, stages: _Stages | None = None) -> Path:
    """The tiny SAM 3 pretrained on style A (``out/prepared_A``, from :func:`prepare_demo`) as a local
    model folder, ``out/pretrained-sam3-tiny``; skipped when it exists."""
    pretrained = out / "pretrained-sam3-tiny"
    if not (pretrained / "config.json").is_file():
        (stages or _Stages()).start(f"pretrain the tiny SAM 3 on style A ({steps} steps)")
        _pretrain(out, pretrained, steps=steps, run_name="pretrain-sam3-run", settings=SAM3_PRETRAIN)
    return pretrained


def _pretrain(
    out: Path, pretrained: Path, *, steps: int, run_name: str = "pretrain-run", settings: dict | None = None
) -> None:
    """Train every parameter of a fresh tiny model on style A, then save it as a local model folder.

    Args:
        settings: config fields over the tiny CLIPSeg's (``model``, ``image_size``, ``lr``).
    """
    from clipseg_bench.model.load import save_model
    from clipseg_bench.model.trained import load_run_model
    from clipseg_bench.train.loop import train

    run = out / run_name
    cfg = load_config(
        None,
        {
            **COMMON,
            "data": str(out / "prepared_A"),
            "out": str(run),
            "model": "tiny",
            "strategy": "full",
            "lr": 1e-3,
            "warmup_steps": 20,  # the pretrained stand-in for CLIP, unchanged since it was measured
            "epochs": 1000,
            "max_steps": steps,
            "val_every": 0,
            **(settings or {}),
        },
    )
    folder = RunFolder(run)
    if folder.record().status != RunStatus.FINISHED:
        train(cfg, resume=folder.has_record())
    save_model(load_run_model(folder).loaded, pretrained)
