"""Images in and out: uint8 conversion, grids, numbered PNGs that carry their settings, img2img input.

Pixel values follow the original scripts (scripts/txt2img.py, scripts/img2img.py) bit for bit:
`255. * clamp((x + 1) / 2, 0, 1)` in float32, truncated to uint8; the grid is torchvision's
`make_grid(nrow=n_rows, padding=2)`; the img2img input is cropped by a LANCZOS resize to multiples of 32.
"""
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

_CHUNK = 1 << 20
_hash_cache: dict = {}


class ImageError(ValueError):
    """An input image or output PNG that cannot be used; the message says which file and what to do."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, truncating as the scripts' `.astype(np.uint8)` does."""
    # float32 first: the scripts ran in float32, and bfloat16 has no numpy dtype
    x = torch.clamp((images.detach().float() + 1.0) / 2.0, min=0.0, max=1.0)
    x = x.cpu().permute(0, 2, 3, 1).numpy()
    return (255. * x).astype(np.uint8)


def make_grid(images: np.ndarray, n_rows: int, padding: int = 2) -> np.ndarray:
    """torchvision.utils.make_grid(images, nrow=n_rows, padding=2, pad_value=0) on (N, H, W, C) arrays.

    As in torchvision (and the scripts' `--n_rows`), n_rows is the number of images in each ROW.
    The scripts build the grid in float in [0, 1] and truncate `255. * grid`; every grid pixel is either
    the pad (0 -> 0) or a copy of an image pixel, and truncation is elementwise, so gridding the already
    truncated uint8 images gives the same bytes.
    """
    n, h, w, c = images.shape
    if n == 1:  # torchvision returns a lone image as is, without padding
        return images[0].copy()
    cols = min(n_rows, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=images.dtype)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[top:top + h, left:left + w] = images[k]
    return grid


def next_index(folder: Path, pattern: str) -> int:
    """One past the highest number among the names in `folder` that fully match `pattern` (group 1)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    numbers = [int(m.group(1)) for m in (re.fullmatch(pattern, name) for name in names) if m]
    return max(numbers, default=-1) + 1


def _write_numbered(folder: Path, prefix: str, digits: int, ext: str, write) -> Path:
    """Write `folder/<prefix><number>.<ext>`, numbered on from what is there; never overwrites.

    The bytes go to a hidden temporary file in the same folder first, which is then linked to its number:
    a run killed mid-write (SIGKILL, a full disk) leaves no half image under an image's name, and `os.link`
    fails rather than replace a name another process took meanwhile, so the numbering stays collision-free."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{prefix}{os.getpid()}-{os.urandom(4).hex()}.{ext}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before a name points at it
        n = next_index(folder, re.escape(prefix) + r"(\d+)\." + ext)
        while True:
            path = folder / f"{prefix}{n:0{digits}d}.{ext}"
            try:
                _link_new(tmp, path)
                return path
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(src: Path, dst: Path) -> None:
    """Give `src`'s file the new name `dst`, FileExistsError if it is taken. A hard link is atomic and never
    replaces; where the filesystem has none (FAT, some network shares), a rename after a check."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if dst.exists():
            raise FileExistsError(dst) from None
        os.rename(src, dst)


def _png_info(parameters: str, settings: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)  # Pillow falls back to iTXt when the text is not latin-1
    info.add_text("ldm", json.dumps(settings, sort_keys=True))
    return info


def save_png(image: np.ndarray, folder: Path, *, parameters: str, settings: dict,
             prefix: str = "", digits: int = 5) -> Path:
    """Write `folder/<prefix><number>.png` with A1111 `parameters` and our `ldm` JSON; never overwrites."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_png takes a (H, W, 3) uint8 array, got {image.dtype} {tuple(image.shape)}")
    info = _png_info(parameters, settings)
    return _write_numbered(folder, prefix, digits, "png",
                           lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=info))


def save_gif(frames: list, folder: Path, *, prefix: str = "", digits: int = 4, ms_per_frame: int = 200) -> Path:
    """An animated GIF of (H, W, 3) uint8 frames, looping; numbered and never overwriting like save_png."""
    images = [Image.fromarray(frame) for frame in frames]
    return _write_numbered(folder, prefix, digits, "gif", lambda f: images[0].save(
        f, format="GIF", save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0))


def _quote(value) -> str:
    # A1111's infotext quoting: values holding its separators are written as JSON strings
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",:\n") else text


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float,
                     seed: int, width: int, height: int, model_hash: str | None, model_name: str | None,
                     extra: dict | None = None) -> str:
    """The AUTOMATIC1111 infotext, so other tools read our PNGs' settings."""
    items = {"Steps": steps, "Sampler": sampler, "CFG scale": cfg_scale, "Seed": seed,
             "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model_name, **(extra or {})}
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in items.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def model_hash(path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):  # checkpoints are gigabytes: stream them
                digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()[:10]
    return _hash_cache[key]


def _open(path: Path, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file; check the path of the {what}") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder; give the path of an image file as the {what}") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, from the header alone
        raise ImageError(f"{path}: {e}; resize it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path}: cannot be read as an image ({type(e).__name__}); give a PNG or JPEG file "
                         f"as the {what}") from None


def _png_text(png_path, key: str) -> str:
    path = Path(png_path)
    with _open(path, "PNG to read") as im:
        text = getattr(im, "text", None) or im.info
        if key not in text:
            raise ImageError(f"{path}: has no '{key}' metadata; only PNGs saved by ldm (or A1111) carry it")
        return text[key]


def read_parameters(png_path) -> str:
    """The A1111 `parameters` text of a PNG."""
    return _png_text(png_path, "parameters")


def read_settings(png_path) -> dict:
    """The settings dict save_png stored in the PNG's `ldm` chunk."""
    return json.loads(_png_text(png_path, "ldm"))


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16/32-bit integer and float single-channel


def _as_8bit(im: Image.Image, path: Path) -> tuple[Image.Image, str | None]:
    """A 16-bit or float image scaled to 8 bits by its range, with a note; PIL's own convert() clips
    16-bit values at 255 (a grey scan turns white) and floats in [0, 1] to 0 or 1 (black)."""
    if im.mode not in _WIDE_MODES:
        return im, None
    a = np.asarray(im, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ImageError(f"{path}: holds NaN or Inf pixels; save it as an ordinary 8-bit PNG or JPEG")
    if im.mode == "F":
        # float images are usually [0, 1]; anything else is stretched from its own minimum to maximum
        lo, hi = (0.0, 1.0) if a.min() >= 0.0 and a.max() <= 1.0 else (float(a.min()), float(a.max()))
    else:
        # the range of the type the values fit: 8-bit data in a wide container stays as it was
        lo = min(0.0, float(a.min()))
        hi = next((m for m in (255.0, 65535.0) if a.max() <= m and lo == 0.0), float(a.max()))
    scaled = np.round((a - lo) / max(hi - lo, 1e-12) * 255.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(scaled), f"converted {path.name} from {im.mode} to 8-bit (its range {lo:g}..{hi:g})"


MAX_INIT_PIXELS = 4096 * 4096  # a 4096x4096 image is a 512x512 latent: 64 times SD 1.x's native area


def load_image(path, *, multiple: int = 32) -> tuple[torch.Tensor, str | None]:
    """An img2img input as (1, 3, H, W) float32 in [-1, 1], H and W cut down to multiples of `multiple`.

    Returns the image and a note saying how it was resized (None when it was not).
    """
    path = Path(path)
    with _open(path, "init image") as im:
        w, h = im.size  # from the header: refuse before gigabytes of pixels are decoded
        if w * h > MAX_INIT_PIXELS:
            raise ImageError(f"{path}: is {w}x{h}; an init image may have at most {MAX_INIT_PIXELS:,} pixels "
                             "(4096x4096), resize it first")
        try:
            image, converted = _as_8bit(im, path)
            image = image.convert("RGB")
        except OSError as e:  # truncated or corrupt data shows up only when the pixels are decoded
            raise ImageError(f"{path}: cannot be decoded ({e}); re-save it as a PNG or JPEG") from None
    w, h = image.size
    if w < multiple or h < multiple:
        raise ImageError(f"{path}: is {w}x{h}; the init image must be at least {multiple}x{multiple} pixels")
    # the original script's crop (scripts/img2img.py: `x - x % 32`; Stability's SD 2 script uses 64)
    new_w, new_h = w - w % multiple, h - h % multiple
    notes = [converted] if converted else []
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.LANCZOS)
        notes.append(f"resized {path.name} from {w}x{h} to {new_w}x{new_h} (multiples of {multiple})")
    note = "; ".join(notes) or None
    array = np.array(image).astype(np.float32) / 255.0
    x = torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy())
    return 2. * x - 1., note
