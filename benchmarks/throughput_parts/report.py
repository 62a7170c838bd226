"""The targets of issue 6, the headline ratios measured against them, and the printed table and summary."""

from __future__ import annotations

import math

from .plans import K

TARGETS = {  # issue 6: minimum ratios, measured on the real architecture
    "decoder_cached_vs_stock": 15.0,
    "full_shared_vs_pairwise": 6.0,
    "segment_vs_pairwise": 8.0,
    "vision_truncation": 1.15,
}
RSS_TARGET_MB = 1.5 * 1024  # decoder-only on cache, batch 4, real architecture
DATA_SHARE_TARGET = 0.05  # data loading / step time, decoder-only on cache, default workers


def _ratio(rows: list[dict], arch: str, strategy: str, mode: str) -> float | None:
    return next(
        (r["ratio"] for r in rows if (r["arch"], r["strategy"], r["mode"]) == (arch, strategy, mode)), None
    )


def _default_workers() -> int:
    from clipseg_bench.config import TrainConfig

    return TrainConfig.model_fields["num_workers"].default


def headline(results: dict[str, dict]) -> dict:
    """The targets of issue 6, on the real architecture when it was measured (else the tiny one)."""
    arch = "real" if "real" in results else "tiny"
    rows = results[arch]["rows"]
    depth_row = next(r for r in rows if r["arch"] == arch and r["mode"].startswith("vision encoder, first"))
    ratios = {
        "decoder_cached_vs_stock": _ratio(rows, arch, "decoder", "engine: cached fp16 features"),
        "full_shared_vs_pairwise": _ratio(rows, arch, "full", "engine: shared encoding"),
        "segment_vs_pairwise": _ratio(rows, arch, "zeroshot", "segment: Segmenter"),
        "vision_truncation": depth_row["ratio"],
    }
    passed = {k: v is not None and v >= TARGETS[k] for k, v in ratios.items()}
    probe = results[arch]["probe"]
    memory = None
    if probe:
        memory = {
            **probe,
            "target_mb": RSS_TARGET_MB,
            "pass": probe["decoder_cached_peak_rss_mb"] <= RSS_TARGET_MB,
        }
    loading = results[arch]["extras"].get("decoder", {})
    share = loading.get("data_share")
    data = {
        "arch": arch,
        "share": share,
        "target": DATA_SHARE_TARGET,
        "pass": share is not None and share <= DATA_SHARE_TARGET,
        "breakdown_s": loading.get("breakdown_s"),
        "num_workers": _default_workers(),
    }
    return {"arch": arch, "ratios": ratios, "pass": passed, "memory": memory, "data_loading": data}


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one row per measurement."""
    from tabulate import tabulate

    cols = ["arch", "strategy", "mode", "masks", "time_s", "masks_per_s", "ratio", "note"]
    headers = ["arch", "strategy", "mode", "masks", "time (s)", "masks/s", "ratio", "note"]
    table = [[r[c] for c in cols] for r in rows]
    return tabulate(table, headers=headers, tablefmt="pipe", floatfmt=".3g", missingval="")


def format_summary(result: dict) -> str:
    """The four headline ratios, memory and data loading with PASS/FAIL against the targets of issue 6,
    and the trainer overhead against the goal of issue 24."""
    mark = {True: "PASS", False: "FAIL"}
    lines = [f"targets of issue 6 ({result['headline_arch']} architecture):"]
    for key, value in result["ratios"].items():
        shown = "n/a" if value is None else f"{value:.2f}x"
        lines.append(f"  {key:<28}{shown:>9}   target >= {TARGETS[key]:g}x   {mark[result['pass'][key]]}")
    mem = result["memory"]
    if mem:
        lines.append(
            f"  {'decoder-on-cache peak RSS':<28}{mem['decoder_cached_peak_rss_mb']:>5.0f} MiB   target <= "
            f"{RSS_TARGET_MB:.0f} MiB at B={mem['batch']} x {K} masks   {mark[mem['pass']]}"
        )
        lines.append(
            f"      of which: after importing torch {mem['torch_import_rss_mb']:.0f} MiB, "
            f"after building the model {mem['model_rss_mb']:.0f} MiB"
        )
    data = result["data_loading"]
    if data["share"] is not None:
        lines.append(
            f"  {'data loading share':<28}{data['share']:>8.1%}   target <= {DATA_SHARE_TARGET:.0%} "
            f"(decoder on cache, default workers)   {mark[data['pass']]}"
        )
    over = result.get("trainer_overhead")
    if over:
        q1, q3 = over["overhead_quartiles"]
        lines += [
            f"goal of issue 24 (tiny architecture, {over['image_size']} px, {over['strategy']}, "
            f"B={over['batch']} x {K} masks):",
            f"  {'trainer overhead':<28}{over['overhead']:>8.1%}   goal <= {over['goal']:.0%}   "
            f"{mark[over['meets_goal']]}",
            f"      trainer step {over['trainer_step_s'] * 1e3:.1f} ms, bare step {over['bare_step_s'] * 1e3:.1f} ms "
            f"(medians); quartiles {q1:.1%}-{q3:.1%}, range {over['overhead_range'][0]:.1%}-"
            f"{over['overhead_range'][1]:.1%} over {over['reps']} reps",
        ]
    return "\n".join(lines)


def clean(obj):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj
