"""The built-in model's world: captioned pictures of one coloured shape, drawn procedurally, and the plain
pixel rule that reads a picture back into (colour, shape, place).

    a {colour} {shape} {place}                                  (the background is any allowed one)
    a {colour} {shape} {place} on a {background} background

Colours red, green, blue, yellow, white, purple, orange; shapes circle, square, triangle; places at the top
left / top right / bottom left / bottom right / in the center; backgrounds black, gray, white, never the
shape's colour. Sizes and exact positions are jittered. Everything is drawn with numpy from a seeded
`np.random.Generator` (4x supersampled, then averaged: smooth edges), so a seed gives the same pictures on
every machine. Some (colour, shape, place) combinations (HELD_OUT) are never drawn for training; the model
has to compose them from what it saw.

`judge(image, caption)` is the rule the tests apply to the model's pictures: the shape's pixels are those far
from the background colour (the median of the border), their mean colour is nearest the named colour, their
centroid nearest the named place, and their fill of their bounding box tells the shape apart (circle pi/4,
square 1, triangle 1/2).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ldm.builtin import SCALE as BUILTIN_SCALE

COLOURS = {"red": (230, 25, 25), "green": (20, 180, 40), "blue": (30, 60, 235), "yellow": (245, 225, 20),
           "white": (255, 255, 255), "purple": (150, 30, 200), "orange": (255, 130, 0)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
# bounding-box centre of the shape, as a fraction of the side (x, y)
PLACES = {"at the top left": (0.31, 0.31), "at the top right": (0.69, 0.31), "at the bottom left": (0.31, 0.69),
          "at the bottom right": (0.69, 0.69), "in the center": (0.5, 0.5)}
FILL = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
# Never drawn for training: each colour, shape and place still appears in other combinations.
HELD_OUT = (("red", "triangle", "at the top right"), ("green", "circle", "at the bottom left"),
            ("blue", "square", "in the center"), ("yellow", "circle", "at the top left"),
            ("white", "triangle", "at the bottom right"), ("purple", "square", "at the top left"),
            ("orange", "triangle", "in the center"), ("green", "square", "at the bottom right"))
SIZE = (0.38, 0.48)  # side of the bounding box, fraction of the image side: big enough that a slightly blurred
                     # decode keeps its corners (the fill rule tells a blurred 10-px triangle from a circle badly)
JITTER = 0.04        # of the position, fraction of the image side
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    place: str
    background: str          # the colour drawn
    named_background: bool   # whether the caption says it
    size: float = 0.35       # fraction of the side
    dx: float = 0.0          # position jitter, fraction of the side
    dy: float = 0.0

    @property
    def caption(self) -> str:
        text = f"a {self.colour} {self.shape} {self.place}"
        return text + (f" on a {self.background} background" if self.named_background else "")


def backgrounds_for(colour: str) -> list[str]:
    return [b for b in BACKGROUNDS if b != colour]


def combos(held_out: bool = False) -> list[tuple[str, str, str]]:
    """Every (colour, shape, place); only the held-out ones, or only the others."""
    every = list(itertools.product(COLOURS, SHAPES, PLACES))
    return [c for c in every if (c in HELD_OUT) == held_out]


def random_scenes(rng: np.random.Generator, n: int, named_background: float = 0.5) -> list[Scene]:
    """n training scenes: a combination that is not held out, a background that is not the shape's colour
    (named in the caption with probability `named_background`), jittered size and position."""
    allowed = combos(held_out=False)
    out = []
    for _ in range(n):
        colour, shape, place = allowed[rng.integers(len(allowed))]
        options = backgrounds_for(colour)
        background = options[rng.integers(len(options))]
        named = bool(rng.random() < named_background)
        size = float(rng.uniform(*SIZE))
        dx, dy = (float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
        out.append(Scene(colour, shape, place, background, named, size, dx, dy))
    return out


def _mask(scene: Scene, side: int) -> np.ndarray:
    """Coverage of the shape in [0, 1], (side, side): the supersampled inside test, averaged."""
    n = side * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n  # pixel-centre coordinates in [0, 1]
    y, x = c[:, None], c[None, :]
    px, py = PLACES[scene.place]
    cx, cy, h = px + scene.dx, py + scene.dy, scene.size / 2
    if scene.shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif scene.shape == "triangle":  # apex up, base as wide as the triangle is high: half its bounding box
        top = cy - h
        inside = (y >= top) & (y <= cy + h) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))


def draw(scene: Scene, side: int) -> np.ndarray:
    """The picture of a scene, uint8 (side, side, 3)."""
    a = _mask(scene, side)[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float64)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    return np.round(a * fg + (1 - a) * bg).astype(np.uint8)


def draw_batch(scenes: list[Scene], side: int) -> np.ndarray:
    """(n, 3, side, side) float32 in [-1, 1], the layout the VAE takes."""
    images = np.stack([draw(s, side) for s in scenes]).astype(np.float32)
    return images.transpose(0, 3, 1, 2) / 127.5 - 1.0


# ---------------------------------------------------------------- reading a picture back
_CAPTION = re.compile(r"^a (\w+) (\w+) (at the \w+ \w+|in the center)(?: on a (\w+) background)?$")


def parse(caption: str) -> tuple[str, str, str, Optional[str]]:
    """(colour, shape, place, background or None) of a caption of the grammar."""
    m = _CAPTION.match(caption.strip())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in PLACES:
        raise ValueError(f"not a caption of the built-in grammar: {caption!r}")
    return m.group(1), m.group(2), m.group(3), m.group(4)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a plain flood fill: pictures are small)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        label[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def _nearest(value: np.ndarray, table: dict) -> str:
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k], dtype=np.float64) - value) ** 2)))


@dataclass(frozen=True)
class Reading:
    """What the pixel rule sees in a picture (None: no shape found)."""
    colour: Optional[str]
    shape: Optional[str]
    place: Optional[str]
    background: str
    fill: float
    pixels: int


def read(image: np.ndarray) -> Reading:
    """The pixel rule on a uint8 (H, W, 3) picture: background = the median of the border pixels; shape =
    the largest connected region of pixels whose distance from it is over half the largest such distance
    (and at least 60 of 255); its mean colour (of its inner pixels, over three quarters of that distance),
    centroid and bounding-box fill give colour, place and shape."""
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    far = np.percentile(dist, 99.5)
    mask = _largest_component(dist > max(60.0, 0.5 * far))
    pixels = int(mask.sum())
    if pixels < 4:
        return Reading(None, None, None, background, 0.0, pixels)
    inner = mask & (dist > 0.75 * far)
    colour = _nearest(img[inner if inner.sum() >= 2 else mask].mean(0), COLOURS)
    ys, xs = np.nonzero(mask)
    centre = np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])
    place = _nearest(centre, PLACES)
    fill = pixels / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    return Reading(colour, shape, place, background, float(fill), pixels)


def judge(image: np.ndarray, caption: str) -> dict:
    """{attribute: right?} for colour, shape, place (and background, when the caption names one)."""
    colour, shape, place, background = parse(caption)
    r = read(image)
    out = {"colour": r.colour == colour, "shape": r.shape == shape, "place": r.place == place}
    if background is not None:
        out["background"] = r.background == background
    return out


def evaluation_captions(rng: np.random.Generator, n_seen: int, per_held_out: int = 2) -> list[tuple[str, bool]]:
    """(caption, held out?) for an evaluation: every held-out combination `per_held_out` times (with and
    without a named background), then `n_seen` captions of combinations seen in training."""
    out = []
    for i in range(per_held_out):
        for colour, shape, place in HELD_OUT:
            scene = Scene(colour, shape, place, backgrounds_for(colour)[i % 2], named_background=i % 2 == 1)
            out.append((scene.caption, True))
    for scene in random_scenes(rng, n_seen):
        out.append((scene.caption, False))
    return out


# ---------------------------------------------------------------- evaluating a model
# what the tests and the trainer's report use; the scale is the one commands give the built-in model
SAMPLING = {"sampler": "ddim", "steps": 20, "scale": BUILTIN_SCALE}


def sample(model, captions: list[str], seed: int = 0, **sampling) -> np.ndarray:
    """The model's pictures of `captions` at its native size, uint8 (n, H, W, 3); image i is seeded seed + i
    whatever the batch."""
    from ldm import pipeline
    from ldm.images import to_uint8

    settings = {**SAMPLING, **sampling}
    side = model.config.vae.resolution
    images = pipeline.txt2img(model, captions, seed=seed, n_samples=len(captions), height=side, width=side,
                              seed_mode="per-sample", **settings)[0]
    return to_uint8(images)


def accuracy(images: np.ndarray, captions: list[tuple[str, bool]]) -> dict:
    """Per-attribute accuracy over all captions and over the held-out combinations alone."""
    verdicts = [(judge(image, caption), held) for image, (caption, held) in zip(images, captions)]

    def rates(rows):
        keys = ("colour", "shape", "place", "background")
        return {k: round(float(np.mean([v[k] for v in rows if k in v])), 3) for k in keys
                if any(k in v for v in rows)} | {"n": len(rows)}

    return {"all": rates([v for v, _ in verdicts]), "held_out": rates([v for v, held in verdicts if held])}


def evaluate_file(path, n_seen: int = 60, seed: int = 0, **sampling) -> dict:
    """Load a model file and report `accuracy` on `evaluation_captions` (every held-out combination twice,
    plus n_seen captions of seen combinations)."""
    import ldm

    model = ldm.load(path, device="cpu")
    captions = evaluation_captions(np.random.default_rng(seed), n_seen)
    images = sample(model, [c for c, _ in captions], seed=seed, **sampling)
    return accuracy(images, captions) | {"sampling": {**SAMPLING, **sampling}}
