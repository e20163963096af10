"""`medsae latent map EXP LATENT SLICE_ID -o map.png`: where one latent fires on one slice."""

from __future__ import annotations

from pathlib import Path

import typer

from medsae.cli.common import RegistryOption, console, name_help, open_registry

app = typer.Typer(no_args_is_help=True)


@app.command("map")
def map_command(
    exp: str = typer.Argument(..., help=name_help()),
    latent: int = typer.Argument(..., help="Latent index (0 .. d_sae - 1)."),
    slice_id: int = typer.Argument(..., help="slice_id of the experiment's slices artifact."),
    output: Path = typer.Option(Path("map.png"), "--output", "-o", help="PNG file to write."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the backbone and the SAE (or auto)."),
    registry: RegistryOption = None,
) -> None:
    """Render the slice, apply the pooled SAE to its spatial tokens and write the latent's map over it."""
    from medsae.ground.latent_map import latent_map, write_map_png
    from medsae.stage import check_writable_file

    check_writable_file(output, "the map")  # before any work: one line naming the path
    m = latent_map(open_registry(registry), exp, latent, slice_id, device=device)
    write_map_png(m, output)
    approx = "" if m.exact else " (CLS pooling: token maps approximate the pooled code)"
    console().print(
        f"wrote {output}: latent {m.latent} on slice {m.slice_id}, map max {float(m.pixels.max()):.4g}, "
        f"pooled pre-activation {m.pooled_pre_act:.4g}, token mean {m.token_mean_pre_act:.4g}{approx}"
    )
