"""``tome-export`` command line.

``tome-export MODEL --target onnx …`` exports (the default command); subcommands sit
beside it. Every :class:`~tome_export.errors.TomeExportError` prints one line and exits
with its ``exit_code``: 2 bad input, 1 failed verification, 3 missing backend. The
options several commands share (``--db``, ``--json``, ``-q``) are defined once below.
"""

from __future__ import annotations

import json
import sys

import click

from tome_export import __version__
from tome_export.errors import TomeExportError, UserError, first_line
from tome_export.interrupts import raising

db_option = click.option("--db", default=None, help="Results database (default under $XDG_CACHE_HOME/tome-export).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout.")


class DefaultToExport(click.Group):
    """A group whose first argument is MODEL unless it names a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToExport, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tome-export")
def main() -> None:
    """Export token-merged PyTorch models to ONNX Runtime, TensorRT and Core ML.

    \b
    tome-export MODEL --target onnx --r 16
    MODEL: timm:NAME | package.module:factory | model.pt2 | model.pt (--trust-pickle)
    """


@main.command("export")
@click.argument("model")
@click.option("--target", default=None, help="onnx | trt | coreml (default: the device's, else onnx).")
@click.option("--method", default="tome", show_default=True, help="Merging method; 'none' exports unmerged.")
@click.option("--r", "r", type=int, default=None, help="Tokens merged per block (default 16; 0 = unmerged).")
@click.option("--schedule", default=None, help="Per-layer r list '16,16,8' or 'linear:R:INFLECTION'.")
@click.option("--input-shape", default=None, help="e.g. 1,3,224,224 (default: the model's own).")
@click.option("-o", "--out", default=None, help="Output folder (default derived from MODEL).")
@click.option("--lowering", default=None, help="Merge lowering (default: the target's).")
@click.option("--device", default=None, help="Device profile (see `tome-export devices`).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--weights", default=None, help="State dict for timm:NAME (weights-only load).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module (runs its code).")
@click.option("--no-verify", is_flag=True, help="Skip the check against eager PyTorch.")
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="Random inputs to verify on.")
@click.option("--atol", type=float, default=None, help="Max abs error allowed (default: the precision's, fp32 1e-4).")
@click.option("--min-cosine", type=float, default=None, help="Min output cosine vs eager (default: the precision's).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Default: the target's on the device.")
@click.option("--int8-mode", default=None, help="int8: static | dynamic (onnx), static (trt), weights (coreml).")
@click.option("--calibration", default=None, help="int8 static: .npz with one array per input (K samples).")
@click.option("--fp32-metric/--no-fp32-metric", default=True, help="fp16/int8: keep the merge's nodes in fp32.")
@click.option("--no-unmerged-baseline", is_flag=True, help="fp16/int8: skip verifying the unmerged model at it too.")
@click.option("--no-prop-attn", is_flag=True, help="Disable proportional attention.")
@click.option("--split", type=click.Choice(["official", "prefix"]), help="tome: A/B split (official ToMe, or prefix).")
@click.option("--pin-decisions", is_flag=True, help="Also verify against eager pinned to the backend's decisions.")
@click.option("--build-engine", is_flag=True, help="--target trt: require a TensorRT engine (exit 3 without TensorRT).")
@click.option("--no-trt-check", is_flag=True, help="--target trt: skip the TensorRT-readiness check.")
@click.option("--chunk-mb", type=float, default=None, help="--target coreml: max weights per model chunk (MB).")
@click.option("--ratio", type=float, default=None, help="tomesd: fraction of tokens merged (default 0.5).")
@click.option("--sx", type=int, default=2, show_default=True, help="tomesd: destination stride along x.")
@click.option("--sy", type=int, default=2, show_default=True, help="tomesd: destination stride along y.")
@click.option("--max-downsample", type=int, default=1, show_default=True, help="tomesd/todo: up to this downsampling.")
@click.option("--downsample", type=float, default=None, help="todo: key/value downsampling per side (default 2).")
@click.option("--component", default=None, help="A diffusers pipeline folder's component (default unet).")
@click.option("--protected", type=click.IntRange(0), help="Graph-level insertion: leading tokens never merged.")
@click.option("--merge-steps", type=int, default=None, help="tdtm: first K denoising steps use merged frames.")
@click.option("--num-steps", type=int, default=None, help="tdtm: denoising steps in all (default 30).")
@click.option("--dynamic-loading", is_flag=True, help="Also split the graph into blocks loaded on demand.")
@click.option("--memory-budget", default=None, help="Dynamic loading budget, e.g. 512MB (default: device's).")
@click.option("--force", is_flag=True, help="Replace an -o folder tome-export did not write (kept aside).")
@json_option("the manifest")
@quiet_option
def export_command(as_json: bool, quiet: bool, **params) -> None:
    """Export MODEL with token merging and verify it against eager PyTorch."""
    from tome_export.options import ExportOptions
    from tome_export.pipeline import export
    from tome_export.progress import Progress

    options = ExportOptions.from_cli(params)
    progress = Progress(quiet)
    path, manifest = export(options, progress)
    warning = ((manifest.get("merge") or {}).get("cost_model") or {}).get("warning")
    if warning:  # merging predicted not to pay: one line, even with -q; not an error
        click.echo(warning, err=True)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    progress.say(f"wrote {path}/ ({', '.join(manifest['artifacts'])}, manifest.json)")


@main.command("devices")
@json_option("the profiles")
def devices_command(as_json: bool) -> None:
    """List device profiles."""
    from tome_export.devices import profiles

    table = profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in table.values()], indent=2))
        return
    for p in table.values():
        click.echo(f"{p.name:<18} {p.default_target:<7} {p.precision:<5} {p.lowering:<8} {p.description}")


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{option} {text!r} is malformed: give integers like 1,8")
    return values


def _sweep_values(texts: tuple[str, ...]) -> tuple[list[int] | None, list[str] | None]:
    """``--sweep r=0,8,16`` and/or ``--sweep precision=fp32,int8`` → (r values, precisions)."""
    r_values, precisions = None, None
    for text in texts:
        name, sep, values = text.partition("=")
        if sep and name.strip() == "r":
            r_values = _int_list(values, "--sweep")
        elif sep and name.strip() == "precision":
            precisions = [v.strip() for v in values.split(",") if v.strip()]
            bad = [p for p in precisions if p not in ("fp32", "fp16", "int8")]
            if bad or not precisions:
                raise UserError(f"--sweep {text!r}: precisions are fp32, fp16, int8 (e.g. precision=fp32,int8)")
        else:
            raise UserError(f"--sweep {text!r} is malformed: use r=0,8,16 or precision=fp32,int8")
    return r_values, precisions


@main.command("profile")
@click.argument("bundle")
@click.option("--device", default=None, help="Device profile to measure on (default: the bundle's).")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up runs.")
@click.option("--batch-sizes", default=None, help="e.g. 1,8: throughput per batch size (re-exports a static bundle).")
@click.option("--sweep", multiple=True, help="r=0,8,16 and/or precision=fp32,int8 (repeat for a grid): re-export each.")
@db_option
@click.option("--no-fidelity", is_flag=True, help="Skip the comparison with the unmerged model.")
@click.option("--trust-pickle", is_flag=True, help="Allow re-loading a pickled source model.")
@click.option("--trust-source", is_flag=True, help="Re-load the manifest's source model (runs its code).")
@click.option("--source", default=None, help="MODEL to compare with / re-export (instead of the manifest's).")
@json_option("the records")
@quiet_option
def profile_command(
    bundle, device, runs, warmup, batch_sizes, sweep, db, no_fidelity, trust_pickle, trust_source, source, as_json, quiet
):
    """Measure BUNDLE's latency, throughput, memory and per-op breakdown; store the results."""
    from tome_export.profiling import ResultStore, profile_bundle
    from tome_export.profiling.report import summarize, table
    from tome_export.profiling.store import results_document
    from tome_export.progress import Progress

    progress = Progress(quiet)
    sizes, (sweep_values, precisions) = _int_list(batch_sizes, "--batch-sizes"), _sweep_values(sweep)
    with ResultStore(db) as store:  # opened first: an unwritable --db fails before measuring
        records = profile_bundle(
            bundle, device, runs, warmup, sizes, sweep_values, progress, trust_pickle, not no_fidelity,
            trust_source, source, precisions,
        )
        store.add(records)
    progress.say(f"stored {len(records)} result(s) in {store.path}")
    for rec in records:
        b = rec["breakdown"]
        if not b["consistent"]:
            progress.say(
                f"note: per-op times cover {b['coverage']:.0%} of end-to-end time for {rec['schedule']} "
                f"bs {rec['batch_size']} (outside ±10%: profiler overhead or untracked work)"
            )
    if as_json:
        click.echo(json.dumps(results_document(records), indent=2))
    else:
        click.echo(table(summarize(records)))


@main.command("report")
@db_option
@json_option("all records (the import-results format)")
@click.option("--plots", default=None, help="Folder for PNG plots (latency vs ratio, per-layer bars).")
@click.option("--import", "import_file", default=None, help="Import a results JSON file first.")
@click.option("--device", default=None, help="Only this device.")
@click.option("--model", default=None, help="Only this model.")
@quiet_option
def report_command(db, as_json, plots, import_file, device, model, quiet):
    """Compare stored results across devices."""
    from tome_export.profiling import ResultStore
    from tome_export.profiling.report import summarize, table, write_plots
    from tome_export.profiling.store import read_results_file, results_document
    from tome_export.progress import Progress

    progress = Progress(quiet)
    with ResultStore(db) as store:
        if import_file:
            added = store.add(read_results_file(import_file))
            progress.say(f"imported {added} new result(s) from {import_file}")
        where = {k: v for k, v in (("device", device), ("model", model)) if v}
        records = store.records(**where)
        if store.unreadable:
            progress.say(f"note: left out {store.unreadable} malformed stored result(s) in {store.path}")
    rows = summarize(records)
    if plots:
        for path in write_plots(records, rows, plots):
            progress.say(f"wrote {path}")
    if as_json:
        click.echo(json.dumps({**results_document(records), "summary": rows}, indent=2))
    else:
        click.echo(table(rows))


@main.command("import-results")
@click.argument("file")
@db_option
@quiet_option
def import_results_command(file, db, quiet):
    """Import results measured elsewhere (Jetson, phone) from a JSON file (`report --json` format)."""
    from tome_export.profiling import ResultStore
    from tome_export.profiling.store import read_results_file
    from tome_export.progress import Progress

    records = read_results_file(file)
    with ResultStore(db) as store:
        added = store.add(records)
    Progress(quiet).say(f"imported {added} new result(s) ({len(records) - added} already stored) into {store.path}")


@main.command("tune")
@click.argument("model")
@click.option("--device", required=True, help="Device profile the budget is for.")
@click.option("--latency-budget", required=True, help="e.g. 20ms, 0.02s.")
@click.option("--candidates", default="0,4,8,12,16", show_default=True, help="r values to consider.")
@click.option("--input-shape", default=None, help="e.g. 1,3,224,224 (default: the model's own).")
@click.option("--runs", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--remeasure", is_flag=True, help="Ignore stored points and measure every candidate.")
@click.option("--precisions", default="fp32", show_default=True, help="Precisions to consider, e.g. fp32,int8.")
@click.option("--min-cosine", type=float, default=None, help="Least fidelity (cosine vs unmerged fp32) to accept.")
@click.option("--no-prune", is_flag=True, help="Measure every candidate, even those the cost model rules out.")
@db_option
@click.option("--trust-pickle", is_flag=True)
@json_option("the decision")
@quiet_option
def tune_command(
    model, device, latency_budget, candidates, input_shape, runs, warmup, remeasure, precisions, min_cosine, no_prune, db,
    trust_pickle, as_json, quiet
):
    """Find the r that meets a latency budget on DEVICE with the best fidelity (exit 1 if none does)."""
    from tome_export.options import parse_input_shape
    from tome_export.profiling import ResultStore
    from tome_export.profiling.tune import parse_budget, tune
    from tome_export.progress import Progress

    budget_ms = parse_budget(latency_budget)
    values = _int_list(candidates, "--candidates")
    if input_shape is not None:
        parse_input_shape(input_shape)
    from tome_export.devices import get_device

    get_device(device)
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    if not precision_list or any(p not in ("fp32", "fp16", "int8") for p in precision_list):
        raise UserError(f"--precisions {precisions!r}: give fp32, fp16 and/or int8 like fp32,int8")
    with ResultStore(db) as store:
        decision = tune(
            model,
            device,
            budget_ms,
            values,
            store,
            input_shape,
            runs,
            warmup,
            remeasure,
            Progress(quiet),
            trust_pickle,
            precision_list,
            min_cosine,
            prune=not no_prune,
        )
    if as_json:
        click.echo(json.dumps(decision, indent=2))
    else:
        for p in decision["points"]:
            mark = "→" if decision["choice"] is p else " "
            cos = "-" if p["cosine"] is None else f"{p['cosine']:.4f}"
            top1 = "-" if p["top1_agreement"] is None else f"{p['top1_agreement']:.1%}"
            click.echo(
                f"{mark} {p['schedule']:<8} {p['precision']:<5} {p['median_ms']:8.2f} ms  cosine {cos}  "
                f"top-1 {top1}  ({p['from']})"
            )
        for p in decision["pruned"]:
            click.echo(f"  r={p['r']:<6} {p['precision']:<5} not measured: {p['why']}")
        if decision["met"]:
            click.echo(
                f"choose {decision['choice']['schedule']} {decision['choice']['precision']}: "
                f"{decision['choice']['median_ms']:.2f} ms ≤ {budget_ms:g} ms budget"
            )
        else:
            fastest = decision["fastest"]
            click.echo(
                f"no candidate meets {budget_ms:g} ms; fastest is {fastest['schedule']} at {fastest['median_ms']:.2f} ms"
            )
    if not decision["met"]:
        raise click.exceptions.Exit(1)


DEBUG_ENV = "TOME_EXPORT_DEBUG"
INTERNAL_ERROR = 70  # EX_SOFTWARE: not bad input, not a failed verification — a bug


def _unexpected(exc: BaseException) -> int:
    """One line for an error nobody anticipated (a bug): exit 70, the traceback on request."""
    import os

    from tome_export.bundle.writer import disk_error

    if isinstance(exc, OSError):
        problem = disk_error(exc, getattr(exc, "filename", None) or "the output")
        if problem is not None:
            click.echo(f"error: {problem}", err=True)
            return 2
    if os.environ.get(DEBUG_ENV):
        import traceback

        traceback.print_exception(exc)
    first = first_line(exc, 300)
    detail = "" if first == type(exc).__name__ else f": {first}"
    click.echo(
        f"error: unexpected {type(exc).__name__}{detail} "
        f"(a bug in tome-export: please report it; {DEBUG_ENV}=1 shows the traceback)",
        err=True,
    )
    return INTERNAL_ERROR


def _interrupted(exc: KeyboardInterrupt) -> int:
    """One line for a stopping signal; exit 128 + N (130 for a bare KeyboardInterrupt)."""
    click.echo(f"error: interrupted{' by ' + str(exc) if str(exc) else ''}; nothing half-written was left", err=True)
    return getattr(exc, "exit_code", 130)


def run(argv: list[str] | None = None) -> int:
    """Entry point: maps our errors and click's usage errors to one line and an exit code;
    anything else becomes one line too (``TOME_EXPORT_DEBUG=1`` prints the traceback)."""
    try:
        # Outside standalone mode click returns a command's Exit code instead of raising it.
        # SIGTERM/SIGHUP raise like SIGINT, so temporary exports and partial folders are removed.
        with raising():
            code = main.main(args=argv, prog_name="tome-export", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:  # click's wrapper of a KeyboardInterrupt
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KeyboardInterrupt):
            return _interrupted(cause)
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except TomeExportError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # SIGINT, SIGTERM, SIGHUP (interrupts.Interrupted)
        return _interrupted(exc)
    except RecursionError:
        click.echo("error: input nested too deeply to process", err=True)
        return 2
    except Exception as exc:
        return _unexpected(exc)
    return code if isinstance(code, int) else 0


def entry() -> None:
    sys.exit(run())
