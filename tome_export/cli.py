"""``tome-export`` command line.

``tome-export MODEL --target onnx …`` exports (the default command); subcommands sit
beside it. Bad input prints one line and exits 2; a failed verification exits 1; a
missing backend exits 3.
"""

from __future__ import annotations

import json
import sys

import click

from tome_export import __version__
from tome_export.errors import BackendMissing, UserError, VerificationError


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
    MODEL: timm:NAME | package.module:factory | model.pt (--trust-pickle)
    """


@main.command("export")
@click.argument("model")
@click.option("--target", default="onnx", show_default=True, help="onnx (more with extras).")
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
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Max abs error allowed.")
@click.option("--no-prop-attn", is_flag=True, help="Disable proportional attention.")
@click.option(
    "--pin-decisions",
    is_flag=True,
    help="Also verify against eager pinned to the backend's merge decisions (tells flipped near-ties from bugs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def export_command(
    model,
    target,
    method,
    r,
    schedule,
    input_shape,
    out,
    lowering,
    device,
    opset,
    weights,
    trust_pickle,
    no_verify,
    seeds,
    atol,
    no_prop_attn,
    pin_decisions,
    as_json,
    quiet,
) -> None:
    """Export MODEL with token merging and verify it against eager PyTorch."""
    from tome_export.pipeline import ExportOptions, export
    from tome_export.progress import Progress

    options = ExportOptions(
        model=model,
        target=target,
        method=method,
        r=r,
        schedule=schedule,
        input_shape=input_shape,
        out=out,
        lowering=lowering,
        device=device,
        opset=opset,
        verify=not no_verify,
        seeds=seeds,
        atol=atol,
        weights=weights,
        trust_pickle=trust_pickle,
        prop_attn=not no_prop_attn,
        pin_decisions=pin_decisions,
    )
    progress = Progress(quiet)
    path, manifest = export(options, progress)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    progress.say(f"wrote {path}/ ({', '.join(manifest['artifacts'])}, manifest.json)")


@main.command("devices")
@click.option("--json", "as_json", is_flag=True)
def devices_command(as_json: bool) -> None:
    """List device profiles."""
    from tome_export.devices import profiles

    table = profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in table.values()], indent=2))
        return
    for p in table.values():
        click.echo(f"{p.name:<20} {p.default_target:<7} {p.precision:<5} {p.lowering:<8} {p.description}")


def run(argv: list[str] | None = None) -> int:
    """Entry point: maps our errors and click's usage errors to one line and an exit code."""
    try:
        main.main(args=argv, prog_name="tome-export", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except (UserError, VerificationError, BackendMissing) as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return 0


def entry() -> None:
    sys.exit(run())
