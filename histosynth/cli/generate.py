"""CLI command: ``histosynth generate`` (slides of any size)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from histosynth.cli.app import app


@app.command("generate")
def generate_cmd(model: Path = typer.Option(..., "--model", help="Image model folder."),
                 size: str = typer.Option(..., "--size", help="Slide size WxH in px, e.g. 2048x2048."),
                 out: Path = typer.Option(..., "--out", help="Output slide, e.g. SLIDE.tiff."),
                 mask_model: Optional[Path] = typer.Option(None, "--mask-model", help="Mask model folder."),
                 mask: Optional[Path] = typer.Option(None, "--mask", help="Mask image (class ids or colours)."),
                 sampler: str = typer.Option("random", help="random, tiles, multidiffusion or diffinfinite."),
                 stride: Optional[int] = typer.Option(None, help="MultiDiffusion stride in latent px (default P/2)."),
                 heal: bool = typer.Option(True, "--heal/--no-heal", help="Random sampler: heal the last steps' "
                                           "cut lines from the previous step's estimate (no extra UNet evaluations)."),
                 heal_steps: int = typer.Option(6, "--heal-steps", help="Random sampler: how many of the last steps "
                                                "heal their cut lines."),
                 heal_detail: float = typer.Option(1.5, "--heal-detail", help="Random sampler: detail finer than "
                                                   "this σ (latent px) a healed step keeps from its own estimate; "
                                                   "0 takes the previous step's estimate whole."),
                 blend_last: int = typer.Option(0, help="Random sampler: also blend a half-shifted second grid over "
                                                       "the last N steps (doubles their cost; 0: never)."),
                 context: Optional[int] = typer.Option(None, help="Latent px of canvas each patch is denoised "
                                                       "with on every side, only its centre kept (default: a "
                                                       "quarter patch; 0: none, about half the time; not with "
                                                       "diffinfinite)."),
                 early_context: Optional[int] = typer.Option(None, help="Context of the early, noisiest steps "
                                                             "(default: --context; README, \"Seams\")."),
                 early_context_steps: Optional[int] = typer.Option(None, help="How many of the first steps take "
                                                                   "--early-context (default: a quarter of "
                                                                   "--steps)."),
                 shared_norms: int = typer.Option(0, "--shared-norms", help="Take every group norm's statistics "
                                                  "over N of a step's windows, measured first, for all its "
                                                  "windows (N more UNet evaluations a step; 0: each window its "
                                                  "own, as in training; README, \"Seams\")."),
                 guidance: float = typer.Option(1.5, help="Classifier-free guidance scale of the mask."),
                 steps: int = typer.Option(25, help="Denoising steps."),
                 mask_steps: int = typer.Option(25, help="Denoising steps of the mask model (with --mask-model)."),
                 mask_context: int = typer.Option(0, help="Mask px of canvas each mask-model patch is denoised "
                                                  "with on every side (README, \"Seams\")."),
                 mask_label: Optional[str] = typer.Option(None, "--mask-label", help="Slide label (subtype) the "
                                                          "layouts follow, for a mask model trained with "
                                                          "--slide-labels."),
                 mask_label_guidance: float = typer.Option(2.0, help="Guidance scale of --mask-label."),
                 scheduler: str = typer.Option("dpm++sde", help="dpm++sde (stochastic DPM-Solver++), dpm++, ddim, ddpm or euler."),
                 seed: int = typer.Option(0, help="Random seed."),
                 batch: int = typer.Option(8, help="Patches per UNet call (micro-batch)."),
                 precision: str = typer.Option("float32", help="The UNets' arithmetic: float32, or bfloat16 "
                                               "autocast (about 2x faster on CPUs with AVX-512 BF16 or AMX, and on "
                                               "GPUs), or float16 autocast (CUDA only)."),
                 format: str = typer.Option("tiff", "--format", help="tiff (OpenSlide/QuPath) or ome-tiff."),
                 compression: str = typer.Option("jpeg", help="Tile compression: jpeg, or deflate (lossless)."),
                 checkpoint_every: int = typer.Option(0, help="Checkpoint the canvas every N steps and after the "
                                                      "last, kept until the slide is written (0: only on signals)."),
                 resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint beside OUT."),
                 stats: Optional[Path] = typer.Option(None, "--stats", help="Write cost, time and memory as JSON."),
                 reference: Optional[Path] = typer.Option(None, "--reference", help="Image or slide whose SSL-"
                                                          "embedding layout the output follows (scaled to --size)."),
                 prior: Optional[Path] = typer.Option(None, "--prior", help="Embedding prior folder (with --text "
                                                      "or --class)."),
                 text: Optional[str] = typer.Option(None, "--text", help="Caption for the embedding prior."),
                 class_name: Optional[str] = typer.Option(None, "--class", help="Class for the embedding prior."),
                 embedding_guidance: float = typer.Option(2.0, help="Guidance scale of the SSL embedding."),
                 style: Optional[List[Path]] = typer.Option(None, "--style", help="Style images, a folder or a "
                                                            "slide (repeatable); one style vector for every patch."),
                 style_guidance: float = typer.Option(2.0, help="Style guidance scale (1: no extra pass).")):
    """Generate a synthetic slide of any size as a pyramidal TIFF, with its mask beside it."""
    from histosynth.checks import finite_number, whole_number
    from histosynth.errors import HistosynthError
    from histosynth.pipelines.generate_slide import (
        GenerateSettings,
        check_generate_paths,
        generate_slide,
        parse_size,
    )

    if mask is not None and mask_model is not None:
        raise HistosynthError("give either --mask or --mask-model, not both")
    width, height = parse_size(size)
    # Every option is checked, and every output path against the inputs, before a model is loaded.
    settings = GenerateSettings(width=width, height=height, sampler=sampler, stride=stride, blend_last=blend_last,
                                heal=heal, heal_steps=heal_steps, heal_detail=heal_detail, context=context,
                                early_context=early_context, early_context_steps=early_context_steps,
                                shared_norms=shared_norms,
                                guidance=guidance,
                                steps=steps, mask_steps=mask_steps, mask_context=mask_context, seed=seed, batch=batch,
                                scheduler=scheduler,
                                mask_label=mask_label, mask_label_guidance=mask_label_guidance,
                                format=format, compression=compression, precision=precision)
    whole_number("--checkpoint-every", checkpoint_every, 0)
    finite_number("--embedding-guidance", embedding_guidance)
    finite_number("--style-guidance", style_guidance)
    check_generate_paths(out, stats, {"--model": model, "--mask": mask, "--mask-model": mask_model,
                                      "--reference": reference, "--prior": prior, "--style": style})
    result = generate_slide(str(model), str(out), settings, str(mask) if mask else None,
                            str(mask_model) if mask_model else None, checkpoint_every, resume,
                            str(stats) if stats else None, style=[str(s) for s in style] if style else None,
                            style_guidance=style_guidance, reference=str(reference) if reference else None,
                            prior=str(prior) if prior else None, text=text, class_name=class_name,
                            embedding_guidance=embedding_guidance)
    if result.get("rank", 0):
        return
    typer.echo(f"{result['unet_evals']} UNet evaluations, {result['cost_per_pass']} per output latent pixel per "
               f"step and pass, {result['seconds']} s, peak {result['peak_rss_mb']} MB")
    typer.echo(f"wrote {out}")
