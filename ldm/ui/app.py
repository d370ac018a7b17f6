"""The page: one tab per command plus Steps and PNG info, and the named API endpoints.

Every Generate is the command itself (ldm/ui/runs.py): the endpoint's parameters are named like the flags,
`/txt2img`, `/img2img`, `/inpaint`, `/depth2img` and `/upscale` take them from gradio_client by keyword, and
all of them share one queue slot (`concurrency_id="model"`, limit 1): one generation at a time. Bad input is a
gr.Error with `print_exception=False`: one line in the page, no traceback in the server's terminal.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..builtin import SCALE as BUILTIN_SCALE, is_builtin, native_size
from ..errors import USER_ERRORS, one_line
from ..images import read_parameters
from ..special_options import DEFAULTS
from .editor import split_editor
from .inputs import readable
from .models import tab_note
from .pnginfo import parse_parameters
from .runs import SAMPLERS, Cancelled, Runner, argv_for, stash_input

QUEUE = dict(concurrency_limit=1, concurrency_id="model")
# Small pictures (a 64-pixel latent, the preview of a tiny model) drawn large, as pixels, not as a blur
CSS = """
#steps-xt img, #steps-x0 img, #steps-eps img, .preview img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""


class Page:
    """The state the events share: the checkpoints on offer, the output folder, the runner."""

    def __init__(self, checkpoints: dict[str, str], outdir: Path, device: str = "auto"):
        self.checkpoints, self.outdir, self.device = checkpoints, Path(outdir), device
        self.runner = Runner()

    def size(self) -> int:
        first = next(iter(self.checkpoints))
        return native_size() if is_builtin(first) else 512

    def scale(self, command: str, default: float) -> float:
        """The CFG slider's start: the built-in model's own guidance on its txt2img and img2img tabs."""
        builtin = is_builtin(next(iter(self.checkpoints)))
        return BUILTIN_SCALE if builtin and command in ("txt2img", "img2img") else default

    def run(self, command: str, ckpt: str, every: int, progress, **form):
        """The generator behind every Generate: (preview, gallery, info) as the run goes."""
        ckpt = ckpt or next(iter(self.checkpoints))
        if ckpt not in self.checkpoints:
            raise gr.Error(f"{ckpt}: not one of this server's checkpoints ({', '.join(self.checkpoints)})",
                           print_exception=False)
        note = tab_note(command, ckpt, self.checkpoints[ckpt])
        if note:
            raise gr.Error(note.replace("**", "").replace("`", ""), print_exception=False)
        preview = None
        try:
            for name in ("init_image", "mask", "depth_map"):
                if form.get(name):
                    form[name] = str(stash_input(form[name], self.outdir))
            argv = argv_for(command, ckpt, self.outdir, self.device, **form)
            steps = self.runner.run(command, argv, every=int(every or 0))
            while True:
                try:
                    p = next(steps)
                except StopIteration as done:
                    result = done.value
                    break
                progress((p.index + 1, p.total), desc=f"{p.label}, step {p.index + 1}/{p.total}")
                if p.preview is not None:
                    preview = p.preview
                    yield preview, gr.skip(), gr.skip()
        except Cancelled as e:
            raise gr.Error(str(e)[:1].upper() + str(e)[1:], title="Cancelled", print_exception=False) from None
        except (*USER_ERRORS, ValueError) as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        files = [(str(p), p.name) for p in result.samples]
        files += [(str(p), label) for p, label in ((result.grid, "grid"), (result.depth, "depth used")) if p]
        text = read_parameters(result.samples[0]) if result.samples else ""
        info = "\n".join([text, "", "Command line:", result.command_line, *[f"note: {n}" for n in result.notes]])
        yield preview, files, info


def _prompts(command: str):
    # value="": the API's defaults are the components' values, so these may be left out of a call
    prompt = gr.Textbox(label="Prompt", value="", lines=2, elem_id=f"{command}-prompt")
    negative = gr.Textbox(label="Negative prompt", value="", lines=1, elem_id=f"{command}-negative_prompt")
    return prompt, negative


def _sampling(command: str, page: Page):
    d = DEFAULTS.get(command, dict(steps=50, scale=7.5 if command == "txt2img" else 5.0))
    id_ = lambda name: f"{command}-{name}"  # noqa: E731  (the browser tests find the fields by these)
    with gr.Row():
        sampler = gr.Dropdown(SAMPLERS, value="DDIM", label="Sampler", allow_custom_value=True, elem_id=id_("sampler"))
        steps = gr.Number(d["steps"], precision=0, label="Steps", elem_id=id_("steps"))
        scale = gr.Slider(0, 30, value=page.scale(command, d.get("scale", 7.5)), step=0.5, label="CFG scale",
                          elem_id=id_("scale"))
    with gr.Row():
        seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id=id_("seed"))
        n_samples = gr.Number(1, precision=0, label="Batch size (n_samples)", elem_id=id_("n_samples"))
        n_iter = gr.Number(1, precision=0, label="Batch count (n_iter)", elem_id=id_("n_iter"))
        every = gr.Number(5, precision=0, label="Preview every N steps (0: none)", elem_id=id_("every"))
    return sampler, steps, scale, seed, n_samples, n_iter, every


def _results(command: str):
    preview = gr.Image(label="Live preview (the linear latent preview)", interactive=False, height=256, format="png",
                       elem_id=f"{command}-preview", elem_classes="preview")
    gallery = gr.Gallery(label="Saved images", columns=4, height="auto", format="png", interactive=False,
                         elem_id=f"{command}-gallery")
    info = gr.Textbox(label="Parameters", lines=4, elem_id=f"{command}-info")
    with gr.Row(elem_id=f"{command}-sends"):
        sends = {to: gr.Button(f"Send to {to}", size="sm") for to in ("img2img", "inpaint", "upscale")}
    return preview, gallery, info, sends


def build(page: Page) -> gr.Blocks:
    from .stepview import steps_tab

    first = next(iter(page.checkpoints))
    with gr.Blocks(title="ldm") as demo:
        with gr.Row():
            ckpt = gr.Dropdown(list(page.checkpoints), value=first, label="Checkpoint", scale=4)
            cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel")
        notes, results, inputs = {}, {}, {}
        with gr.Tabs() as tabs:
            for command in ("txt2img", "img2img", "inpaint", "depth2img", "upscale"):
                with gr.Tab(command, id=command):
                    notes[command] = gr.Markdown(tab_note(command, first, page.checkpoints[first]))
                    with gr.Row():
                        with gr.Column():
                            inputs[command] = _tab_inputs(command, page)
                        with gr.Column():
                            results[command] = _results(command)
            with gr.Tab("Steps", id="steps"):
                steps_tab(page, ckpt)
            with gr.Tab("PNG info", id="pnginfo"):
                png = readable(gr.Image(type="filepath", image_mode=None, label="Drop a PNG", sources=["upload"],
                                        elem_id="pnginfo-image"))
                png_text = gr.Textbox(label="parameters", lines=4, elem_id="pnginfo-text")
                to_txt2img = gr.Button("Send to txt2img")
        _wire(page, ckpt, inputs, results, tabs)
        png.change(_png_text, png, png_text, api_visibility="private")
        t = inputs["txt2img"]
        form = [t["prompt"], t["negative_prompt"], t["steps"], t["sampler"], t["scale"], t["seed"], t["width"],
                t["height"]]
        to_txt2img.click(_fill_txt2img, png_text, [*form, tabs], api_visibility="private")
        cancel.click(lambda: page.runner.cancel(), None, None, queue=False, concurrency_limit=None,
                     api_name="cancel")
        ckpt.change(lambda c: [tab_note(k, c, page.checkpoints[c]) for k in notes], ckpt, list(notes.values()),
                    api_visibility="private")
    return demo


def _tab_inputs(command: str, page: Page) -> dict:
    f = {}
    f["prompt"], f["negative_prompt"] = _prompts(command)
    if command == "inpaint":
        f["editor"] = readable(gr.ImageEditor(type="pil", image_mode="RGBA",
                                              label="Image: paint over what to repaint",
                                              brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                                              elem_id="inpaint-editor"))
        f["init_image"] = readable(gr.Image(type="filepath", image_mode=None, visible=False))
        f["mask"] = readable(gr.Image(type="filepath", image_mode=None, visible=False))
        f["api"] = gr.Button(visible=False)
    elif command != "txt2img":
        f["init_image"] = readable(gr.Image(type="filepath", image_mode=None, label="Image",
                                            sources=["upload", "clipboard"], elem_id=f"{command}-init_image"))
    if command == "depth2img":
        f["depth_map"] = readable(gr.Image(type="filepath", image_mode=None, label="Depth map (optional: else MiDaS)",
                                           sources=["upload"], elem_id="depth2img-depth_map"))
    f["sampler"], f["steps"], f["scale"], f["seed"], f["n_samples"], f["n_iter"], f["every"] = _sampling(command, page)
    if command == "txt2img":
        with gr.Row():
            f["width"] = gr.Number(page.size(), precision=0, label="Width", elem_id="txt2img-width")
            f["height"] = gr.Number(page.size(), precision=0, label="Height", elem_id="txt2img-height")
    if command in ("img2img", "depth2img"):
        f["strength"] = gr.Slider(0, 1, value=0.75 if command == "img2img" else 0.9, step=0.01,
                                  label="Denoising strength", elem_id=f"{command}-strength")
    if command == "upscale":
        f["noise_level"] = gr.Slider(0, 350, value=20, step=1, label="Noise level", elem_id="upscale-noise_level")
    f["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{command}-generate")
    return f


# The endpoints: their parameter names are the API's (and the flags').
def _endpoints(page: Page):
    def txt2img(prompt, negative_prompt, steps, sampler, scale, seed, n_samples, n_iter, width, height, ckpt,
                every=5, progress=gr.Progress()):
        if not (prompt or "").strip():
            raise gr.Error("Type a prompt: txt2img draws what the prompt says", print_exception=False)
        yield from page.run("txt2img", ckpt, every, progress, prompt=prompt, negative_prompt=negative_prompt,
                            steps=steps, sampler=sampler, scale=scale, seed=seed, n_samples=n_samples,
                            n_iter=n_iter, width=width, height=height)

    def img2img(prompt, negative_prompt, init_image, steps, sampler, scale, seed, n_samples, n_iter, strength,
                ckpt, every=5, progress=gr.Progress()):
        yield from page.run("img2img", ckpt, every, progress, prompt=prompt, negative_prompt=negative_prompt,
                            init_image=_needs(init_image, "an image to start from"), steps=steps, sampler=sampler,
                            scale=scale, seed=seed, n_samples=n_samples, n_iter=n_iter, strength=strength)

    def inpaint(prompt, negative_prompt, init_image, mask, steps, sampler, scale, seed, n_samples, n_iter, ckpt,
                every=5, progress=gr.Progress()):
        yield from page.run("inpaint", ckpt, every, progress, prompt=prompt, negative_prompt=negative_prompt,
                            init_image=_needs(init_image, "an image to repaint"),
                            mask=_needs(mask, "a mask (white = repaint)"), steps=steps, sampler=sampler,
                            scale=scale, seed=seed, n_samples=n_samples, n_iter=n_iter)

    def inpaint_page(prompt, negative_prompt, editor, steps, sampler, scale, seed, n_samples, n_iter, ckpt, every,
                     progress=gr.Progress()):
        try:
            init_image, mask = split_editor(editor, page.outdir)
        except USER_ERRORS as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        yield from inpaint(prompt, negative_prompt, init_image, mask, steps, sampler, scale, seed, n_samples,
                           n_iter, ckpt, every, progress)

    def depth2img(prompt, negative_prompt, init_image, steps, sampler, scale, seed, n_samples, n_iter, strength,
                  ckpt, depth_map=None, every=5, progress=gr.Progress()):
        yield from page.run("depth2img", ckpt, every, progress, prompt=prompt, negative_prompt=negative_prompt,
                            init_image=_needs(init_image, "an image to re-render"), depth_map=depth_map or None,
                            steps=steps, sampler=sampler, scale=scale, seed=seed, n_samples=n_samples,
                            n_iter=n_iter, strength=strength)

    def upscale(prompt, negative_prompt, init_image, steps, sampler, scale, seed, n_samples, n_iter, noise_level,
                ckpt, every=5, progress=gr.Progress()):
        yield from page.run("upscale", ckpt, every, progress, prompt=prompt, negative_prompt=negative_prompt,
                            init_image=_needs(init_image, "an image to upscale"), steps=steps, sampler=sampler,
                            scale=scale, seed=seed, n_samples=n_samples, n_iter=n_iter, noise_level=noise_level)

    return dict(txt2img=txt2img, img2img=img2img, inpaint=inpaint, inpaint_page=inpaint_page, depth2img=depth2img,
                upscale=upscale)


def _needs(image, what: str):
    if not image:
        raise gr.Error(f"Upload {what}", print_exception=False)
    return image


def _wire(page: Page, ckpt, inputs, results, tabs):
    fns = _endpoints(page)
    import inspect

    for command, f in inputs.items():
        preview, gallery, info, sends = results[command]
        fn = fns[command]
        names = [n for n in inspect.signature(fn).parameters if n != "progress"]
        comps = [ckpt if n == "ckpt" else f[n] for n in names]
        outputs = [preview, gallery, info]
        if command == "inpaint":  # the page paints its mask; the API takes two images
            page_names = [n for n in inspect.signature(fns["inpaint_page"]).parameters if n != "progress"]
            run = f["generate"].click(fns["inpaint_page"], [ckpt if n == "ckpt" else f[n] for n in page_names],
                                      outputs, api_visibility="private", **QUEUE)
            f["api"].click(fn, comps, outputs, api_name=command, **QUEUE)
        else:
            run = f["generate"].click(fn, comps, outputs, api_name=command, **QUEUE)
        # what this tab's send-to buttons send: the run's first image, or the one clicked in the gallery
        # (a Gallery's .change does not fire for a generator's output, so it follows the run's success)
        chosen = gr.State(None)
        run.success(lambda g: g[0][0] if g else None, gallery, chosen, api_visibility="private")
        gallery.select(_picked, None, chosen, api_visibility="private")
        targets = {"img2img": inputs["img2img"]["init_image"], "inpaint": inputs["inpaint"]["editor"],
                   "upscale": inputs["upscale"]["init_image"]}
        for to, button in sends.items():
            button.click(_send(to), chosen, [targets[to], tabs], api_visibility="private")


def _picked(evt: gr.SelectData):
    value = evt.value or {}
    image = value.get("image", value) if isinstance(value, dict) else value
    return image.get("path") if isinstance(image, dict) else image


def _send(to: str):
    def send(path):
        if not path:
            raise gr.Error("Make or pick an image first", print_exception=False)
        value = {"background": path, "layers": [], "composite": path} if to == "inpaint" else path
        return value, gr.Tabs(selected=to)
    return send


def _png_text(path):
    if not path:
        return ""
    try:
        return read_parameters(path)
    except USER_ERRORS as e:
        return one_line(e)


def _fill_txt2img(text: str):
    p = parse_parameters(text or "")
    order = ("prompt", "negative_prompt", "steps", "sampler", "scale", "seed", "width", "height")
    return [*(p[k] if k in p else gr.skip() for k in order), gr.Tabs(selected="txt2img")]
