"""The `clipseg-bench` command: thin subcommands that parse, call one function, and report.

Every subcommand turns an :class:`~clipseg_bench.errors.InputError` (and a usage mistake argparse
finds) into one line on stderr naming the flag or file, and exit code 2; a
:class:`~clipseg_bench.errors.RunFailed` (a benchmark run that failed) into one line and exit code 1.
Heavy imports (torch, transformers) happen inside the handlers so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from clipseg_bench.errors import FieldError, InputError, ReportedError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the flag (an InputError), not a usage block."""

    def error(self, message: str):
        raise InputError(None, f"{message.removeprefix('argument ')} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _names(text: str) -> list[str]:
    """ "a,b" -> ["a", "b"]: no empty item and no repeat (a repeat would run or count twice)."""
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated names such as a,b, got {text!r}")
    repeated = sorted({s for s in items if items.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]!r} is given twice")
    return items


def _seed(text: str) -> int:
    """A seed: a whole number >= 0 (numpy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seeds(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]: seeds (>= 0), none repeated."""
    try:
        values = [_seed(s) for s in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds such as 0,1,2 ({exc})") from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]} is given twice")
    return values


def _cmd_phantom(a: argparse.Namespace) -> None:
    from clipseg_bench.data.phantom import write_phantoms

    paths = write_phantoms(
        Path(a.out), cases=a.cases, seed=a.seed, style=a.style, size=a.size, overwrite=a.overwrite
    )
    print(f"wrote {len(paths)} phantom cases to {a.out}")


def _cmd_prepare(a: argparse.Namespace) -> None:
    from clipseg_bench.data.prepare import prepare, summary_line

    out = prepare(
        images=a.images,
        labels=a.labels,
        dataset=a.dataset,
        out=a.out,
        window=a.window,
        val_fraction=a.val_fraction,
        seed=a.seed,
        split_file=a.split_file,
        groups=a.groups,
        folds=a.folds,
        test_fraction=a.test_fraction,
        keep_empty=a.keep_empty,
        workers=a.workers,
        overwrite=a.overwrite,
        label_map=a.label_map,
        layout=a.layout,
        png=not a.no_png,
    )
    print(summary_line(out))


def _cmd_strategies(a: argparse.Namespace) -> None:
    from clipseg_bench.strategies import parameter_table

    rows = parameter_table(a.model)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'strategy':<10} {'trainable':>12} {'total':>12} {'share':>8}")
    for r in rows:
        share = r["trainable_params"] / max(r["total_params"], 1)
        print(f"{r['strategy']:<10} {r['trainable_params']:>12,} {r['total_params']:>12,} {share:>8.2%}")


_TRAIN_FLAGS = (
    "data",
    "out",
    "model",
    "strategy",
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "decoder_lr",
    "seed",
    "fold",
    "image_size",
    "mixed_precision",
    "num_workers",
    "cache_dir",
)


def _set_values(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs -> {field: YAML value}."""
    import yaml

    values = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise InputError("--set", f"expected key=value, got {kv!r}")
        key, value = kv.split("=", 1)
        try:
            values[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError(f"--set {key}", f"not a YAML value ({str(exc).splitlines()[0]})") from None
    return values


def _cmd_train(a: argparse.Namespace) -> None:
    from clipseg_bench.config import load_config, read_yaml_config
    from clipseg_bench.train.loop import train
    from clipseg_bench.train.record import resume_config

    overrides = {**{k: getattr(a, k) for k in _TRAIN_FLAGS}, **_set_values(a.set)}
    if a.resume:
        out = a.out or (read_yaml_config(a.config).get("out") if a.config else None)
        if not out:
            raise InputError("--out", "required with --resume: the run folder to continue")
        cfg = resume_config(Path(out), path=a.config, overrides=overrides)
    else:
        cfg = load_config(a.config, overrides)
    run = train(cfg, resume=a.resume)
    if a.evaluate and int(os.environ.get("RANK", "0")) == 0:  # once, not on every data-parallel rank
        from clipseg_bench.evaluation.evaluate import evaluate_run

        _print_metrics(evaluate_run(run=run), run)


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from clipseg_bench.evaluation.evaluate import evaluate_run

    metrics = evaluate_run(
        run=Path(a.run),
        data=Path(a.data) if a.data else None,
        split=a.split,
        max_cases=a.max_cases,
        postprocess_mode=a.postprocess,
        cache_dir=a.cache_dir,
    )
    _print_metrics(metrics, a.run)


def _print_metrics(metrics: dict, run) -> None:
    from clipseg_bench.run_folder import RunFolder

    path = RunFolder(run).metrics_file(metrics.get("split", "val"))
    if metrics.get("no_split"):
        print(f"{metrics['no_split']}: nothing to evaluate -> {path}")
        return
    s = metrics["summary"]
    print(f"dice2d {metrics['dice2d']:.4f}  dsc3d {s['dsc']:.4f}  nsd3d {s['nsd']:.4f}  -> {path}")


def _cmd_score(a: argparse.Namespace) -> None:
    from clipseg_bench.evaluation.score import score_folder

    score_folder(
        pred=Path(a.pred),
        labels=Path(a.labels),
        out=Path(a.out) if a.out else None,
        missing_as_empty=a.missing_as_empty,
        postprocess_mode=a.postprocess,
        overwrite=a.overwrite,
    )


def _cmd_segment(a: argparse.Namespace) -> None:
    from clipseg_bench.evaluation.segment import segment

    segment(
        run=a.run,
        model=a.model,
        strategy=a.strategy,
        ct=Path(a.ct),
        out=Path(a.out),
        organs=a.organs,
        probabilities=a.probabilities,
        threshold=a.threshold,
        per_organ=a.per_organ,
        postprocess_mode=a.postprocess,
        overwrite=a.overwrite,
    )


def _cmd_benchmark(a: argparse.Namespace) -> None:
    from clipseg_bench.study.matrix import raise_failed, run_matrix

    out = Path(a.out)
    from clipseg_bench.strategies import available, display_order

    results = run_matrix(
        data=a.data,
        model=a.model,
        strategies=a.strategies or display_order(available()),
        seeds=a.seeds,
        epochs=a.epochs,
        out=out,
        shard=a.shard,
        config=a.config,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        extra={"budget": a.budget},
        evaluate=not a.no_evaluate,
        launcher=a.launcher,
        strategy_lr=_parse_lrs(a.lrs),
        train_cases=a.train_cases,
        folds=a.folds,
        postprocess=a.postprocess,
        test=a.test,
        overwrite=a.overwrite,
        lr_sweep=a.lr_sweep,
        lr_grid=a.lr_grid,
        tune_fraction=a.tune_fraction,
    )
    raise_failed(results, out)


def _parse_lrs(spec: str | None) -> dict[str, float]:
    """``full=1e-5,decoder=1e-3`` -> {strategy: rate}; each strategy once (a second rate would be
    silently dropped). The rates themselves are checked by the config (positive, finite)."""
    out: dict[str, float] = {}
    for item in (spec or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            name = name.strip()
            try:
                rate = float(value)
            except ValueError:
                raise InputError(
                    "--lrs", f"expected strategy=lr pairs such as full=1e-5, got {item!r}"
                ) from None
            if name in out:
                raise InputError("--lrs", f"{name} is given twice ({name}={out[name]:g}, {name}={rate:g})")
            out[name] = rate
    return out


def _cmd_report(a: argparse.Namespace) -> None:
    from clipseg_bench.study.report import write_report

    html = write_report(
        [Path(p) for p in a.bench],
        out=Path(a.out) if a.out else None,
        overwrite=a.overwrite,
        equivalence_margin=a.equivalence_margin,
        split=a.split,
    )
    print(f"report: {html}")


def _cmd_demo(a: argparse.Namespace) -> None:
    from clipseg_bench.study.demo import run_demo

    run_demo(out=Path(a.out), quick=a.quick, lr_sweep=a.lr_sweep, families=a.families)


def _add_cache_dir_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--cache-dir",
        help="folder of the frozen-feature cache (default: $CLIPSEG_BENCH_CACHE, else PREPARED/feature_cache "
        "when writable, else feature_cache/ beside the run folder)",
    )


def _add_postprocess_flag(s: argparse.ArgumentParser, what: str, *, auto: bool = False) -> None:
    s.add_argument(
        "--postprocess",
        default="none",
        choices=["none", "lcc", "auto"] if auto else ["none", "lcc"],
        help="3D clean-up: lcc keeps each organ's largest component, paired organs on their side"
        + (
            "; auto: lcc for the organs where the run's recorded choice (postprocess.json, made on "
            "out-of-fold scores by `benchmark --postprocess auto`) found it raises the score"
            if auto
            else ""
        )
        + f" ({what})",
    )


def _add_split_flags(s: argparse.ArgumentParser) -> None:
    """prepare's split: train/val or K folds, and the held-out test cases (issue 22)."""
    s.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of cases for validation (without --folds)"
    )
    s.add_argument(
        "--folds",
        type=int,
        help="K: every non-test case in one of K folds (by patient, balanced, seeded); a run on fold k "
        "trains on the others and validates on k (`benchmark --folds all`)",
    )
    s.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of patients set aside as the test split before the split or folds: read only by "
        "`evaluate --split test` and `report --split test` (default 0)",
    )
    s.add_argument(
        "--seed", type=_seed, default=0, help="seed of the patient-level split, folds and test draw (>= 0)"
    )
    s.add_argument(
        "--split-file",
        help='JSON {"train": [...], "val": [...], "test": [...]} or {"folds": [[...], ...], "test": [...]} '
        "instead of a random split ('test' optional)",
    )


def _add_fold_flags(s: argparse.ArgumentParser) -> None:
    """benchmark's fold axis, the clean-up choice made on its out-of-fold scores, the test split."""
    s.add_argument(
        "--folds",
        help="'all' or fold numbers such as 0,2 (data prepared with --folds K): each cell trains on the "
        "other folds and is evaluated on its own, and `report` pools the out-of-fold scores; runs = "
        "strategies x seeds x folds (x training-case counts), e.g. 6 x 3 x 5 = 90 for FLARE22",
    )
    s.add_argument(
        "--postprocess",
        default="none",
        choices=["none", "auto"],
        help="auto (needs --folds): after the runs, choose per organ whether the 3D clean-up (lcc) "
        "raises the out-of-fold score, and record it in BENCH/postprocess-auto.json and each run "
        "(what `segment --postprocess auto` and `--test` apply)",
    )
    s.add_argument(
        "--test",
        action="store_true",
        help="train nothing: evaluate every finished run of the matrix on the held-out test split "
        "(RUN/metrics-test.json), once choices are frozen; then `report --split test`",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clipseg-bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantom", help="write synthetic abdominal CT volumes + labels (FLARE22 layout)")
    s.add_argument("--out", required=True, help="folder to write images/ and labels/ into")
    s.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the phantoms (>= 0, default 0)")
    s.add_argument("--style", default="A", choices=["A", "B"], help="A: pretraining look; B: shifted look")
    s.add_argument("--size", type=int, default=96, help="in-plane voxels (default 96)")
    s.add_argument(
        "--overwrite", action="store_true", help="write into a folder that holds more than phantoms"
    )
    s.set_defaults(func=_cmd_phantom, parser=s)

    s = sub.add_parser("prepare", help="CT volumes -> axial slices, manifest, array cache, dataset.json")
    s.add_argument("--images", help="folder of <case>_0000.nii.gz or <case>/ DICOM series (FLARE22 layout)")
    s.add_argument("--labels", help="folder of <case>.nii.gz label volumes")
    s.add_argument(
        "--dataset", help="dataset folder: MSD/nnU-Net (dataset.json, imagesTr/, labelsTr/) or --layout"
    )
    s.add_argument(
        "--layout",
        default="msd",
        choices=["msd", "per-organ"],
        help="what --dataset is: msd (default) or per-organ (<case>/ct.nii.gz + <case>/segmentations/*.nii.gz)",
    )
    s.add_argument("--out", required=True, help="PREPARED folder to write")
    s.add_argument(
        "--window",
        default="40,400",
        help="'minmax' (original study) or 'LEVEL,WIDTH' in HU (default 40,400 = [-160,240])",
    )
    _add_split_flags(s)
    s.add_argument("--groups", help="CSV with columns case,patient: a patient's cases stay on one side")
    s.add_argument("--keep-empty", action="store_true", help="also list slices with no organ for training")
    s.add_argument(
        "--label-map",
        help="flare22 | totalsegmentator | btcv | amos | abdomenatlas | a YAML file (source id -> FLARE22 id; "
        "names for per-organ files); default: the names in dataset.json, else FLARE22 ids",
    )
    s.add_argument("--workers", type=int, default=1, help="cases processed in parallel")
    s.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty foreign folder")
    s.add_argument("--no-png", action="store_true", help="skip the human-viewable PNG slices")
    s.set_defaults(func=_cmd_prepare, parser=s)

    s = sub.add_parser("strategies", help="list fine-tuning strategies with parameter counts")
    s.add_argument("--model", default="tiny", help="hub id, local folder, or 'tiny'")
    s.add_argument(
        "--json", action="store_true", help="print JSON (strategy, trainable_params, total_params)"
    )
    s.set_defaults(func=_cmd_strategies, parser=s)

    s = sub.add_parser("train", help="fine-tune one strategy on a PREPARED folder")
    s.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    s.add_argument("--data", help="PREPARED folder")
    s.add_argument("--out", help="run folder")
    s.add_argument("--model", help="hub id, local folder, or 'tiny' (default tiny)")
    s.add_argument("--strategy", help="zeroshot | full | decoder | adapter | lora | bitfit | ...")
    s.add_argument("--epochs", type=_positive_int, help="default 20")
    s.add_argument("--max-steps", type=_positive_int, help="stop after N optimizer steps")
    s.add_argument("--batch-size", type=_positive_int, help="slices per step (default 8)")
    s.add_argument(
        "--lr", type=float, help="peak learning rate of the strategy's own trainables (default: per strategy)"
    )
    s.add_argument(
        "--decoder-lr", type=float, help="peak learning rate of the decoder, shared by every strategy (1e-3)"
    )
    s.add_argument("--seed", type=int, help="seed of the run (weights of injected modules, order, dropout)")
    s.add_argument(
        "--fold",
        type=int,
        help="with data prepared with --folds K: train on the other folds, validate on this one (0..K-1)",
    )
    s.add_argument("--image-size", type=int, help="square input side in px (default: the model's own)")
    s.add_argument(
        "--mixed-precision", choices=["auto", "no", "bf16", "fp16"], help="autocast (auto: bf16 on CUDA)"
    )
    s.add_argument("--num-workers", type=int, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    _add_cache_dir_flag(s)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config field (YAML value)")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    s.add_argument("--evaluate", action="store_true", help="run `evaluate` on the val split afterwards")
    s.set_defaults(func=_cmd_train, parser=s)

    s = sub.add_parser("evaluate", help="2D Dice and FLARE22 3D DSC/NSD of a run -> RUN/metrics.json")
    s.add_argument("--run", required=True, help="run folder written by `clipseg-bench train`")
    s.add_argument("--data", help="PREPARED folder (default: the one the run trained on)")
    s.add_argument(
        "--split",
        default="val",
        choices=["train", "val", "test"],
        help="which cases to score (default val: the run's fold with folds -> RUN/metrics.json); test: the "
        "held-out cases, once choices are frozen -> RUN/metrics-test.json",
    )
    s.add_argument("--max-cases", type=_positive_int, help="evaluate only the first N cases")
    _add_cache_dir_flag(s)
    _add_postprocess_flag(s, "which 3D scores are the headline (none and lcc are always written)", auto=True)
    s.set_defaults(func=_cmd_evaluate, parser=s)

    s = sub.add_parser("score", help="FLARE22 DSC/NSD of a folder of predicted NIfTI masks")
    s.add_argument("--pred", required=True, help="folder of <case>.nii.gz multi-label predictions")
    s.add_argument("--labels", required=True, help="folder of <case>.nii.gz ground truth")
    s.add_argument("--out", help="CSV to write (case, organ, dsc, nsd)")
    s.add_argument("--missing-as-empty", action="store_true", help="score a missing prediction as empty")
    _add_postprocess_flag(s, "clean each prediction before scoring it")
    s.add_argument(
        "--overwrite", action="store_true", help="replace an --out file that `score` did not write"
    )
    s.set_defaults(func=_cmd_score, parser=s)

    s = sub.add_parser("segment", help="segment a CT with a tuned run (or zero-shot) -> NIfTI mask")
    s.add_argument("--run", help="run folder from `train`")
    s.add_argument("--model", help="with --strategy zeroshot: hub id, local folder or 'tiny'")
    s.add_argument("--strategy", help="only 'zeroshot' is meaningful without --run")
    s.add_argument(
        "--ct",
        required=True,
        help="CT: a .nii/.nii.gz file or a DICOM series folder; or a folder of those (then --out is a folder)",
    )
    s.add_argument("--out", required=True, help="mask to write (.nii.gz), or a folder of <case>.nii.gz")
    s.add_argument("--organs", help="comma-separated organ keys (default all 13)")
    s.add_argument("--probabilities", action="store_true", help="also write per-organ probabilities")
    s.add_argument("--threshold", type=_probability, default=0.5, help="between 0 and 1 (default 0.5)")
    s.add_argument(
        "--per-organ",
        nargs="?",
        const="also",
        choices=["also", "only"],
        help="also (or only) write <case>/segmentations/<organ_key>.nii.gz, one binary mask per organ",
    )
    _add_postprocess_flag(s, "clean the mask before writing it", auto=True)
    s.add_argument(
        "--overwrite", action="store_true", help="replace an --out file that `segment` did not write"
    )
    s.set_defaults(func=_cmd_segment, parser=s)

    s = sub.add_parser(
        "benchmark",
        help="run strategies x seeds (x training cases), one run folder each",
        description="Train and evaluate every (strategy, seed[, training cases]) cell in its own process, "
        "one run folder each under BENCH/runs/. Finished cells are skipped and interrupted ones resumed on "
        "the next call; a BENCH folder holds one set of settings (a call that changes them is refused).",
    )
    s.add_argument("--data", required=True, help="PREPARED folder written by `clipseg-bench prepare`")
    s.add_argument(
        "--model",
        default="tiny",
        help="hub id, local save_pretrained folder, or a tiny spec (default tiny); several comma-separated "
        "(e.g. tiny,sam3-tiny) train every cell from each and the report shows them side by side",
    )
    s.add_argument(
        "--strategies",
        type=_names,
        help="comma-separated strategies (default: every registered strategy, in report order; "
        "see `clipseg-bench strategies`)",
    )
    s.add_argument(
        "--seeds",
        type=_seeds,
        default="0,1,2",
        help="comma-separated seeds (>= 0), one run per strategy each (default 0,1,2)",
    )
    s.add_argument(
        "--epochs", type=_positive_int, default=20, help="passes over the training slices (default 20)"
    )
    s.add_argument(
        "--max-steps",
        type=_positive_int,
        help="stop every run after this many optimizer steps (a step budget)",
    )
    s.add_argument("--batch-size", type=_positive_int, help="slices per optimizer step (default 8)")
    s.add_argument(
        "--budget",
        choices=["steps", "epochs"],
        help="with --train-cases: steps (default) gives every training-set size the optimizer steps "
        "of the whole training set (--epochs passes over all its slices); epochs makes --epochs "
        "passes over each subset's own slices",
    )
    s.add_argument("--config", help="YAML of TrainConfig fields shared by every run; the flags here win")
    s.add_argument("--out", required=True, help="BENCH folder (runs/, configs/, logs/, bench-shard<i>.json)")
    s.add_argument("--shard", help="i/n: run only every n-th cell starting at i (e.g. a SLURM array task)")
    s.add_argument("--no-evaluate", action="store_true", help="skip `evaluate` after each run")
    s.add_argument(
        "--lrs",
        help="per-strategy learning rates, e.g. full=1e-5,decoder=1e-3 (default: each strategy's own, "
        "in its file under strategies/)",
    )
    s.add_argument(
        "--lr-sweep",
        type=_positive_int,
        metavar="N",
        help="first choose each strategy's rate (decoder-only: decoder_lr) from N log-spaced rates "
        "around its default, a factor sqrt(10) apart (3: x1/sqrt(10), x1, x sqrt(10); 5: x1/10..x10), "
        "on tune cases carved from the training cases (--tune-fraction), on the first seed and fold; "
        "the matrix then trains at the chosen rates. Adds N runs per strategy that trains (5 x 3 = 15 "
        "for --lr-sweep 3), recorded in BENCH/lr-sweep.json and counted in each strategy's cost",
    )
    s.add_argument(
        "--lr-grid",
        action="append",
        metavar="STRATEGY=A,B,C",
        help="an explicit sweep grid for one strategy, e.g. full=1e-5,3e-5,1e-4 (repeat per strategy; "
        "wins over --lr-sweep's grid for that strategy)",
    )
    s.add_argument(
        "--tune-fraction",
        type=float,
        default=0.2,
        help="share of the training cases (by patient, fixed by the first seed) the sweep tunes on; "
        "never the cases the report scores (default 0.2)",
    )
    s.add_argument(
        "--launcher",
        help='command that starts each training process, e.g. "accelerate launch --num_processes 4"',
    )
    s.add_argument(
        "--train-cases",
        help="data-efficiency axis: training-case counts, fractions or 'all', e.g. 1,5,all or 0.25,0.5,1.0 "
        "(nested subsets fixed by the seed; the val split stays the same)",
    )
    _add_fold_flags(s)
    s.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder that is not a BENCH folder"
    )
    s.set_defaults(func=_cmd_benchmark, parser=s)

    s = sub.add_parser("report", help="tables, plots and report.html from one or more BENCH folders")
    s.add_argument("bench", nargs="+", help="BENCH folder(s); shards are merged")
    s.add_argument("--out", help="where to write (default: the first BENCH folder)")
    s.add_argument(
        "--split",
        default="val",
        choices=["val", "test"],
        help="val (default): metrics.json, pooled out of fold with folds; test: the held-out test "
        "split (metrics-test.json from `evaluate --split test` / `benchmark --test`)",
    )
    s.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out folder that is not ours"
    )
    s.add_argument(
        "--equivalence-margin",
        type=float,
        default=0.01,
        help="two strategies are called equivalent only when two one-sided tests put their difference "
        "within +-this margin (val 3D DSC and NSD units; default 0.01); recorded in paired.csv",
    )
    s.set_defaults(func=_cmd_report, parser=s)

    s = sub.add_parser("demo", help="the whole study at smoke scale, nothing downloaded")
    s.add_argument(
        "--out", default="demo_out", help="folder for everything the demo writes (default demo_out)"
    )
    s.add_argument("--quick", action="store_true", help="fewer steps (tests)")
    s.add_argument(
        "--lr-sweep",
        type=_positive_int,
        metavar="N",
        help="choose each strategy's rate first from N around its demo rate (benchmark --lr-sweep): "
        "N x 5 more runs, past the 10 minutes of `make demo`",
    )
    s.add_argument(
        "--families",
        action="store_true",
        help="also pretrain a tiny SAM 3 and benchmark it beside the tiny CLIPSeg (about 30 min; no data axis)",
    )
    s.set_defaults(func=_cmd_demo, parser=s)
    return p


# Fields whose flag is not ``--<field>`` (the field a value sets is the flag's dest elsewhere).
FIELD_ALIASES = {
    "benchmark": {"strategy": "--strategies", "seed": "--seeds", "lr": "--lrs"},
}


def field_flags(args: argparse.Namespace) -> dict[str, str]:
    """The one field -> flag table of the command that ran: each option's dest (``max_steps`` ->
    ``--max-steps``), the fields whose flag has another name (:data:`FIELD_ALIASES`), and for ``train``
    every field given with ``--set`` (``--set input_channels``)."""
    parser = getattr(args, "parser", None)
    table = {
        action.dest: max(action.option_strings, key=len)
        for action in (parser._actions if parser else [])
        if action.option_strings and action.dest != "help"
    }
    table.update(FIELD_ALIASES.get(getattr(args, "command", ""), {}))
    for kv in getattr(args, "set", None) or []:
        key = kv.split("=", 1)[0]
        table[key] = f"--set {key}"
    return table


def _message(exc: ReportedError, args: argparse.Namespace | None) -> str:
    """The error's line, naming the flag behind a field (:class:`~clipseg_bench.errors.FieldError`)."""
    if isinstance(exc, FieldError) and args is not None:
        flag = field_flags(args).get(exc.field.split(".", 1)[0])
        if flag is not None:
            rest = exc.field.partition(".")[2]
            return f"{flag}: {rest + ': ' if rest else ''}{exc.problem}"
    return exc.message


# Exit code after a closed pipe (`clipseg-bench strategies --json | head -1`): what a shell reports
# for a POSIX tool that SIGPIPE ended, 128 + 13, without a word on stderr.
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE


def _closed_pipe() -> int:
    """Leave quietly after the reader of stdout went away: point stdout at /dev/null, so that the
    interpreter's last flush cannot fail again and print a second traceback (Python's documented way)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_CLOSED_PIPE


def main(argv: list[str] | None = None) -> int:
    args = None
    # ulimit -f: a write past the limit must fail (EFBIG, one line) rather than kill the process
    # (SIGXFSZ). Python ignores it at start-up already; set here too for embedders that did not.
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
    except BrokenPipeError:
        return _closed_pipe()
    except ReportedError as exc:
        print(f"error: {_message(exc, args)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
