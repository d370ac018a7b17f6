"""The README's pictures of the built-in model, made again from the shipped file:

    python tools/builtin_pictures.py          # docs/builtin_first.png, builtin_samples.png, builtin_steps.png

- builtin_first.png: what the README's first command writes (its own code path, in a temporary folder);
- builtin_samples.png: captions of the grammar (the held-out combinations marked *), one picture each, with
  what tools/shapes.py's pixel rule reads in it;
- builtin_steps.png: the model denoising one caption, DDIM's predicted x0 at each step, decoded.
The model's pictures are 32x32: shown 4x, nearest neighbour, so every pixel is the model's own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import ldm  # noqa: E402
from ldm import pipeline  # noqa: E402
from ldm.images import to_uint8  # noqa: E402
from shapes import HELD_OUT, SAMPLING, judge, parse, sample  # noqa: E402

CAPTIONS = ["a red circle at the top left", "a blue square at the bottom right on a white background",
            "a yellow triangle in the center", "a green square at the top right on a black background",
            "a white circle at the bottom left on a gray background", "a purple triangle at the top right",
            # held out of training: the model composes them
            "a red triangle at the top right", "a blue square in the center", "a green circle at the bottom left",
            "a orange triangle in the center on a white background", "a purple square at the top left",
            "a yellow circle at the top left on a black background"]
ZOOM = 4
FIRST = ["--prompt", "a red circle at the top left", "--plms", "--skip_grid", "--n_samples", "1"]  # the README's


def labelled(images: np.ndarray, labels: list[list[str]], columns: int, width: int = 232) -> Image.Image:
    """Each picture zoomed, with its lines of text under it, in a grid of `columns`."""
    side = images.shape[1] * ZOOM
    cell_h = side + 8 + 12 * max(len(lines) for lines in labels)
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, lines) in enumerate(zip(images, labels)):
        x, y = (k % columns) * width, (k // columns) * cell_h
        sheet.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x + (width - side) // 2, y + 4))
        for i, line in enumerate(lines):
            draw.text((x + 4, y + side + 6 + 12 * i), line, fill="black")
    return sheet


def samples(model, seed: int, out: Path) -> None:
    images = sample(model, CAPTIONS, seed=seed)
    labels = []
    for image, caption in zip(images, CAPTIONS):
        colour, shape, place, background = parse(caption)
        marker = " *" if (colour, shape, place) in HELD_OUT else ""
        verdict = judge(image, caption)
        wrong = [k for k, ok in verdict.items() if not ok]
        labels.append([f"{colour} {shape}{marker}", place.replace("at the ", "") +
                       (f", on {background}" if background else ""), "read: " + ("right" if not wrong else
                                                                               "wrong " + "/".join(wrong))])
    labelled(images, labels, columns=6).save(out)


def first_command(out: Path) -> None:
    import tempfile

    from ldm.generate import main as generate

    with tempfile.TemporaryDirectory() as tmp:
        assert generate("txt2img", FIRST + ["--ckpt", "builtin", "--outdir", tmp]) == 0
        files = sorted((Path(tmp) / "samples").glob("*.png"))
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        labelled(images, [[f"samples/{f.name}"] for f in files], columns=len(files), width=150).save(out)


@torch.no_grad()
def steps(model, caption: str, seed: int, out: Path) -> None:
    side = model.config.vae.resolution
    generator = pipeline.make_generators(seed, 1, "per-sample")
    run = list(pipeline.txt2img_steps(model, caption, height=side, width=side, generator=generator,
                                      steps=SAMPLING["steps"], sampler=SAMPLING["sampler"], scale=SAMPLING["scale"]))
    shown = [s for s in run if s.index % 2 == 0 or s.index == s.total - 1]
    images = to_uint8(torch.cat([pipeline.decode(model, s.pred_x0) for s in shown]))
    labels = [[f"step {s.index + 1}", f"t = {int(s.t) if torch.is_tensor(s.t) else s.t}"] for s in shown]
    sheet = labelled(images, labels, columns=len(shown), width=side * ZOOM + 8)
    title = Image.new("RGB", (sheet.width, 18), "white")
    ImageDraw.Draw(title).text((4, 3), f'"{caption}": the predicted x0 at each step (DDIM, {SAMPLING["steps"]} '
                                       f'steps, scale {SAMPLING["scale"]}, seed {seed})', fill="black")
    both = Image.new("RGB", (sheet.width, sheet.height + 18), "white")
    both.paste(title, (0, 0))
    both.paste(sheet, (0, 18))
    both.save(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="builtin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = ldm.load(args.ckpt, device="cpu")
    args.outdir.mkdir(parents=True, exist_ok=True)
    first_command(args.outdir / "builtin_first.png")
    samples(model, args.seed, args.outdir / "builtin_samples.png")
    steps(model, "a red circle at the top left", args.seed, args.outdir / "builtin_steps.png")
    print(f"wrote builtin_first.png, builtin_samples.png and builtin_steps.png in {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
