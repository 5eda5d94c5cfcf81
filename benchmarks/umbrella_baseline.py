"""The baseline's umbrella profile of a reaction config, without labels or models.

Builds the system of a pipeline config (``qmlmm pipeline``'s build step) into RUN/system and runs the
umbrella windows with the baseline engine into RUN/umbrella/baseline, exactly as the pipeline does
(same folders and settings, so a later ``qmlmm pipeline CONFIG -o RUN`` reuses both), then writes the
MBAR profile and its checks to benchmarks/results/<name>.{json,md,png}.

    python benchmarks/umbrella_baseline.py examples/sam_cytosine/config.yaml --size small -o runs/sam_small \\
        --name sam_small_baseline_umbrella
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import RESULTS, machine, save_json, save_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--size", default="small")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--name", default="baseline_umbrella")
    a = ap.parse_args()

    from qmlmm.analysis.plots import profile_plot
    from qmlmm.engines import make_engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.pipeline import build_step, load_pipeline_config, umbrella_profile

    cfg = load_pipeline_config(a.config, a.size)
    if not cfg.reaction:
        raise SystemExit(f"{a.config} has no reaction")
    a.out.mkdir(parents=True, exist_ok=True)
    system = a.out / "system"
    t0 = time.perf_counter()
    if not (system / "meta.json").exists():
        build_step(cfg, system)
    t_build = time.perf_counter() - t0
    emb = EmbeddingSettings(cfg.cutoff, cfg.switch_width)
    res = umbrella_profile(
        cfg, a.out, system, "baseline", lambda: make_engine(cfg.baseline, threads=cfg.total_threads), emb
    )
    res["seconds_this_invocation"] = time.perf_counter() - t0
    res["build_seconds"] = t_build
    res["baseline"] = cfg.baseline
    res["system"] = json.loads((system / "meta.json").read_text())["box_nm"]
    profile_plot({"baseline": res}, RESULTS / f"{a.name}.png")
    rows = [
        f"| {k} | {v} |"
        for k, v in res.items()
        if k
        in (
            "windows",
            "steps_per_window",
            "barrier_forward_kjmol",
            "barrier_forward_err_kjmol",
            "x_top_nm",
            "barrier_forward_halves_kjmol",
            "barrier_forward_halves_err_kjmol",
            "halves_agree",
            "barrier_forward_unbiased_kjmol",
            "barrier_forward_unbiased_err_kjmol",
            "ess_unbiased",
            "weakest_cut_overlap",
            "windows_stopped_early",
            "window_correlation_time_ps",
            "seconds_this_invocation",
        )
    ]
    save_json(a.name, {**res, "machine": machine(), "config": str(a.config), "size": a.size})
    save_markdown(
        a.name,
        [
            f"# {cfg.name} ({a.size}): umbrella profile of the baseline {cfg.baseline}/MM",
            "",
            f"`python benchmarks/umbrella_baseline.py {a.config} --size {a.size} -o {a.out} --name {a.name}` "
            f"on {machine()}; windows chained from their neighbours' final positions and velocities, MBAR on "
            "decorrelated samples.",
            "",
            "| quantity | value |",
            "|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
