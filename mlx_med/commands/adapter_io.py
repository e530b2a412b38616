"""``mlx-med export-adapter`` / ``import-adapter``: adapters to and from Hugging Face PEFT's format."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_med.commands.options import force_option


@click.command("export-adapter")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="PEFT folder to create (adapter_config.json + adapter_model.safetensors).")
@click.option("--base-model", help="base_model_name_or_path to record, e.g. the HF export of the base "
                                   "(mlx-med export) or a Hub id. [default: the base the adapter was trained on]")
@click.option("--own-only", is_flag=True,
              help="For an SFT run stacked on a PT run: export its own ΔW only (default: both, as one adapter).")
@force_option
def export_adapter(src: Path, out_dir: Path, base_model: str | None, own_only: bool, force: bool) -> None:
    """Export the adapter in SRC (a run, merged or imported adapter dir) to PEFT format.

    \b
    Loads with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), OUT).
    Example:
      mlx-med export-adapter runs/sft -o sft-peft --base-model base-hf
    """
    from mlx_med.adapters.peft_io import export_peft
    from mlx_med.io import check_output_dir

    check_output_dir(out_dir, force=force, inputs=[src])  # before any loading
    result = export_peft(src, out_dir, base_model=base_model, own_only=own_only, force=force)
    for note in result.notes:
        click.echo(note)
    click.echo(f"wrote {result.out_dir} (PEFT LoRA, r={result.rank}, lora_alpha={result.lora_alpha:g}, "
               f"{result.modules} modules)")


@click.command("import-adapter")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="mlx-med adapter directory to create.")
@click.option("--base", type=click.Path(path_type=Path),
              help="MLX base model folder to check the adapter against (modules, shapes) and record, so "
                   "merge/fuse can verify it is paired with adapters of the same base.")
@force_option
def import_adapter(src: Path, out_dir: Path, base: Path | None, force: bool) -> None:
    """Import a PEFT LoRA adapter in SRC (LLaMA-Factory, MedicalGPT, peft) as an mlx-med adapter.

    \b
    The result works with merge, fuse, eval and chat (--adapter OUT). Example:
      mlx-med import-adapter llamafactory/saves/sft -o runs/sft-gpu --base base
    """
    from mlx_med.adapters.peft_io import import_peft
    from mlx_med.io import check_output_dir

    check_output_dir(out_dir, force=force, inputs=[src, base])  # before any loading
    adapter = import_peft(src, out_dir, base=base, force=force)
    click.echo(f"wrote {out_dir} (rank {adapter.rank}, scale {adapter.scale:g}, {len(adapter.modules())} modules"
               f"{', checked against ' + str(base) if base else ''})")


commands = [export_adapter, import_adapter]
