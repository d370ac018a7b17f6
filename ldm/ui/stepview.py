"""The Steps tab, for students: one txt2img run kept step by step, then a slider over its steps showing x_t,
the predicted x0 (decoded by the VAE) and the noise estimate side by side with the step's t or σ; Export
writes the filmstrip and GIF of `python -m ldm steps` with the same flags (that command, run here)."""
from __future__ import annotations

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F

from .. import pipeline
from ..errors import USER_ERRORS, one_line
from ..images import to_uint8
from .runs import SAMPLERS, Cancelled, argv_for, parse


def channels_as_rgb(latent: torch.Tensor, size: int) -> np.ndarray:
    """A latent's first three channels, each stretched to its own range, enlarged to `size` (nearest)."""
    z = latent[:1, :3].float().cpu()
    lo, hi = z.amin(dim=(2, 3), keepdim=True), z.amax(dim=(2, 3), keepdim=True)
    z = (z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
    return to_uint8(F.interpolate(z, size=(size, size * z.shape[-1] // z.shape[-2]), mode="nearest"))[0]


def record(page, ckpt, prompt, negative_prompt, sampler, steps, scale, seed, width, height):
    """Run txt2img for one image and keep every step (on the CPU); the state the slider reads."""
    argv = argv_for("txt2img", ckpt, page.outdir, page.device, prompt=prompt, negative_prompt=negative_prompt,
                    sampler=sampler, steps=steps, scale=scale, seed=seed, width=width, height=height,
                    n_samples=1, n_iter=1)
    args, plan, check = parse("txt2img", argv)
    page.runner.begin()
    model = page.runner.model(args, plan, check)
    generator = pipeline.make_generators(args.seed, 1, args.seed_mode)
    run = pipeline.txt2img_steps(model, plan.batches[0], negative_prompt=args.negative_prompt, n_samples=1,
                                 height=plan.height, width=plan.width, steps=args.ddim_steps, sampler=plan.spec.name,
                                 schedule=plan.spec.schedule, scale=args.scale, eta=args.ddim_eta, generator=generator,
                                 prompt_syntax=args.prompt_syntax)
    kept = []
    for s in run:
        page.runner.check_cancel(s.index, s.total)  # Cancel stops this run too, at the next step
        kept.append(dict(x=s.x.cpu(), eps=s.eps.cpu(), pred_x0=s.pred_x0.cpu(),
                         where=f"t = {s.t}" if s.t is not None else f"σ = {s.sigma:.4g}"))
    return {"argv": argv, "steps": kept, "height": plan.height, "decoded": {}}


def show(page, state, index: int):
    if not state:
        return None, None, None, ""
    i = max(0, min(int(index), len(state["steps"]) - 1))
    s, h = state["steps"][i], state["height"]
    if i not in state["decoded"]:
        state["decoded"][i] = to_uint8(pipeline.decode(page.runner.current(), s["pred_x0"]))[0]
    label = f"step {i + 1} of {len(state['steps'])}: {s['where']}"
    return channels_as_rgb(s["x"], h), state["decoded"][i], channels_as_rgb(s["eps"], h), label


def export(page, state):
    if not state:
        raise gr.Error("Run first", print_exception=False)
    from ..filmstrip import main as steps_command

    argv = list(state["argv"])
    argv[argv.index("--outdir") + 1] = str(page.outdir / "steps")
    if "--skip_grid" in argv:
        argv.remove("--skip_grid")
    before = set((page.outdir / "steps").glob("steps-*"))
    if steps_command(argv) != 0:
        raise gr.Error("the steps command failed; see the server's terminal")
    return sorted(str(p) for p in set((page.outdir / "steps").glob("steps-*")) - before)


def steps_tab(page, ckpt):
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="steps-prompt")
        negative = gr.Textbox(label="Negative prompt", lines=2, scale=2, elem_id="steps-negative_prompt")
    with gr.Row():
        sampler = gr.Dropdown(SAMPLERS, value="DDIM", label="Sampler", allow_custom_value=True,
                              elem_id="steps-sampler")
        steps = gr.Number(20, precision=0, label="Steps", elem_id="steps-steps")
        scale = gr.Slider(0, 30, value=7.5, step=0.5, label="CFG scale", elem_id="steps-scale")
    with gr.Row():
        seed = gr.Number(42, precision=0, label="Seed (-1: random)", elem_id="steps-seed")
        width = gr.Number(page.size(), precision=0, label="Width", elem_id="steps-width")
        height = gr.Number(page.size(), precision=0, label="Height", elem_id="steps-height")
    run = gr.Button("Run", variant="primary", elem_id="steps-run")
    state = gr.State(None)
    slider = gr.Slider(1, 20, value=1, step=1, label="Step", elem_id="steps-slider")
    where = gr.Markdown(elem_id="steps-where")
    with gr.Row():
        x_t = gr.Image(label="x_t (latent channels 0-2)", interactive=False, height=320, elem_id="steps-xt")
        x0 = gr.Image(label="predicted x0 (decoded)", interactive=False, height=320, elem_id="steps-x0")
        eps = gr.Image(label="noise estimate ε (latent channels 0-2)", interactive=False, height=320,
                       elem_id="steps-eps")
    export_button = gr.Button("Export filmstrip + GIF")
    files = gr.File(label="Filmstrip and GIF", file_count="multiple")

    def go(ckpt_, prompt_, negative_, sampler_, steps_, scale_, seed_, width_, height_):
        try:
            st = record(page, ckpt_, prompt_, negative_, sampler_, steps_, scale_, seed_, width_, height_)
        except Cancelled as e:
            raise gr.Error(str(e)[:1].upper() + str(e)[1:], title="Cancelled", print_exception=False) from None
        except (*USER_ERRORS, ValueError) as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        n = len(st["steps"])
        return st, gr.Slider(1, n, value=n, step=1, label="Step"), *show(page, st, n - 1)

    run.click(go, [ckpt, prompt, negative, sampler, steps, scale, seed, width, height],
              [state, slider, x_t, x0, eps, where], api_visibility="private", concurrency_limit=1,
              concurrency_id="model")
    slider.change(lambda st, i: show(page, st, int(i) - 1), [state, slider], [x_t, x0, eps, where],
                  api_visibility="private")
    export_button.click(lambda st: export(page, st), state, files, api_visibility="private",
                        concurrency_limit=1, concurrency_id="model")
