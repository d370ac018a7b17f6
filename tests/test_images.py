"""ldm.images: uint8 conversion as the original scripts, torchvision's grid, numbered PNGs, img2img input."""
from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, fixture_tensors
from ldm import images
from ldm.images import (ImageError, a1111_parameters, load_image, make_grid, model_hash, next_index,
                        read_parameters, read_settings, save_png, to_uint8)


def _rgb(*values):
    return np.array(values, dtype=np.uint8)


# ---- to_uint8 -------------------------------------------------------------------------------------------

def test_to_uint8_truncates_like_the_scripts():
    # (x+1)/2 then 255*x truncated: 0 -> 127.5 -> 127 (rounding would give 128), 0.999 -> 254.87 -> 254
    values = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 3.0])
    expected = np.array([0, 0, 127, 254, 255, 255], dtype=np.uint8)
    x = values.view(1, 1, 1, -1).expand(2, 3, 1, -1)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 6, 3)
    for b in range(2):
        for c in range(3):
            np.testing.assert_array_equal(out[b, 0, :, c], expected)


def test_to_uint8_channel_order_and_other_dtypes():
    x = -torch.ones(1, 3, 2, 2)
    x[0, 0, 0, 1] = 1.0  # red at row 0, column 1
    x[0, 2, 1, 0] = 1.0  # blue at row 1, column 0
    out = to_uint8(x)
    np.testing.assert_array_equal(out[0, 0, 1], _rgb(255, 0, 0))
    np.testing.assert_array_equal(out[0, 1, 0], _rgb(0, 0, 255))
    np.testing.assert_array_equal(out[0, 0, 0], _rgb(0, 0, 0))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        np.testing.assert_array_equal(to_uint8(x.to(dtype)), out)
    np.testing.assert_array_equal(to_uint8(x.clone().requires_grad_()), out)


@pytest.mark.parametrize("name", ["sd1_tiny", "sd2_tiny", "sd2v_tiny"])
def test_to_uint8_matches_original_txt2img(name):
    rec = fixture_tensors(name, "txt2img")
    # the fixture keeps the clamped [0, 1] image; map it back to the decoder's [-1, 1] range
    decoded = (2.0 * rec["image01_nhwc"] - 1.0).permute(0, 3, 1, 2)
    ours = to_uint8(decoded)[0].astype(np.int16)
    png = np.array(Image.open(FIXTURES[name] / "txt2img.png").convert("RGB")).astype(np.int16)
    ref = rec["image_uint8_hwc"].numpy().astype(np.int16)
    np.testing.assert_array_equal(png, ref)
    diff = np.abs(ours - ref)
    print(f"{name}: max uint8 diff {diff.max()}, pixels differing {np.count_nonzero(diff)} of {diff.size}")
    assert diff.max() <= 1  # the round trip through [-1, 1] can move a value across a truncation edge


# ---- make_grid ------------------------------------------------------------------------------------------

def test_grid_2x2_of_single_pixels():
    pixels = _rgb([10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]).reshape(4, 1, 1, 3)
    # 2 px of padding around and between: columns at 2 and 5 of 8, rows at 2 and 5 of 8
    expected = np.zeros((8, 8, 3), dtype=np.uint8)
    expected[2, 2], expected[2, 5] = (10, 20, 30), (40, 50, 60)
    expected[5, 2], expected[5, 5] = (70, 80, 90), (100, 110, 120)
    np.testing.assert_array_equal(make_grid(pixels, n_rows=2), expected)


def test_grid_incomplete_last_row_and_wide_rows():
    pixels = _rgb([1, 1, 1], [2, 2, 2], [3, 3, 3]).reshape(3, 1, 1, 3)
    expected = np.zeros((8, 8, 3), dtype=np.uint8)
    expected[2, 2], expected[2, 5], expected[5, 2] = 1, 2, 3
    np.testing.assert_array_equal(make_grid(pixels, n_rows=2), expected)
    # n_rows is images per row (torchvision's nrow); more than there are images gives one row of them
    one_row = np.zeros((5, 11, 3), dtype=np.uint8)
    one_row[2, 2], one_row[2, 5], one_row[2, 8] = 1, 2, 3
    np.testing.assert_array_equal(make_grid(pixels, n_rows=8), one_row)


def test_grid_non_square_images_in_a_column():
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, size=(2, 2, 3, 3), dtype=np.uint8)  # 2 images, 2 high, 3 wide
    expected = np.zeros((10, 7, 3), dtype=np.uint8)
    expected[2:4, 2:5] = imgs[0]
    expected[6:8, 2:5] = imgs[1]
    np.testing.assert_array_equal(make_grid(imgs, n_rows=1), expected)


def test_grid_of_one_image_is_the_image():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)
    np.testing.assert_array_equal(make_grid(img, n_rows=4), img[0])  # torchvision returns it unpadded


def test_grid_of_truncated_images_equals_truncated_float_grid():
    # the scripts grid float [0, 1] images, then truncate 255 * grid
    x = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    floats = torch.clamp((x + 1) / 2, 0, 1).permute(0, 2, 3, 1).numpy()
    from_float = (255. * make_grid(floats, n_rows=3)).astype(np.uint8)
    np.testing.assert_array_equal(make_grid(to_uint8(x), n_rows=3), from_float)


# ---- numbering and never overwriting --------------------------------------------------------------------

def _save(folder, **kw):
    return save_png(np.zeros((4, 4, 3), np.uint8), folder, parameters="p", settings={}, **kw)


def test_numbering_continues_after_highest(tmp_path):
    assert next_index(tmp_path / "missing", r"(\d+)\.png") == 0
    first = _save(tmp_path / "new" / "samples")
    assert first.name == "00000.png"
    assert _save(first.parent).name == "00001.png"
    for name in ["00003.png", "00010.png", "notes.txt", "grid-0042.png", "abc.png", "00099.jpg", "7.png.bak"]:
        (tmp_path / name).write_bytes(b"x")
    assert next_index(tmp_path, r"(\d+)\.png") == 11
    assert _save(tmp_path).name == "00011.png"
    assert _save(tmp_path, prefix="grid-", digits=4).name == "grid-0043.png"
    assert _save(tmp_path).name == "00012.png"


def test_never_overwrites_even_if_next_index_lies(tmp_path, monkeypatch):
    (tmp_path / "00000.png").write_bytes(b"precious")
    (tmp_path / "00001.png").write_bytes(b"also precious")
    monkeypatch.setattr(images, "next_index", lambda folder, pattern: 0)
    assert _save(tmp_path).name == "00002.png"
    assert (tmp_path / "00000.png").read_bytes() == b"precious"
    assert (tmp_path / "00001.png").read_bytes() == b"also precious"


def test_concurrent_savers_get_distinct_files(tmp_path):
    saved, errors = [], []

    def worker():
        try:
            saved.extend(_save(tmp_path) for _ in range(5))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(saved)) == 30 and sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}.png" for i in range(30)]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(image):
        raise OSError("disk full")

    monkeypatch.setattr(images.Image, "fromarray", broken)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rejects_non_uint8_image(tmp_path):
    with pytest.raises(ValueError):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path, parameters="", settings={})
    assert list(tmp_path.iterdir()) == []


# ---- metadata -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["a photograph of an astronaut riding a horse", "un café ☕ 猫, rendu 4k"])
def test_metadata_round_trip(tmp_path, prompt):
    image = np.random.default_rng(1).integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    params = a1111_parameters(prompt, "blurry", 50, "DDIM", 7.5, 42, 16, 8, "abcdef1234", "tiny")
    settings = {"prompt": prompt, "seed": 42, "scale": 7.5, "steps": 50, "size": [16, 8], "eta": 0.0}
    path = save_png(image, tmp_path, parameters=params, settings=settings)
    with Image.open(path) as im:
        assert im.text["parameters"] == params and im.info["parameters"] == params
        assert im.text["ldm"] == json.dumps(settings, sort_keys=True)
        assert json.loads(im.info["ldm"]) == settings
        np.testing.assert_array_equal(np.array(im), image)
    assert read_parameters(path) == params
    assert read_settings(path) == settings


def test_read_errors(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(ImageError, match="plain.png.*ldm"):
        read_settings(plain)
    with pytest.raises(ImageError, match="nothing.png"):
        read_parameters(tmp_path / "nothing.png")


def test_a1111_parameters_format():
    text = a1111_parameters("a cat", "blurry, ugly", 50, "DDIM", 7.5, 42, 512, 512, "abcdef1234",
                            "v1-5-pruned-emaonly")
    assert text == ("a cat\nNegative prompt: blurry, ugly\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, "
                    "Size: 512x512, Model hash: abcdef1234, Model: v1-5-pruned-emaonly")
    text = a1111_parameters("a cat", "", 20, "PLMS", 9.0, 7, 768, 512, "0123456789", "m",
                            extra={"Eta": 0.5, "Denoising strength": 0.75, "Note": "a, b"})
    assert text == ("a cat\nSteps: 20, Sampler: PLMS, CFG scale: 9.0, Seed: 7, Size: 768x512, "
                    'Model hash: 0123456789, Model: m, Eta: 0.5, Denoising strength: 0.75, Note: "a, b"')
    assert a1111_parameters("x", "", 1, "DDIM", 1.0, 0, 64, 64, None, None).endswith("Size: 64x64")


def test_model_hash_streams_and_caches(tmp_path, monkeypatch):
    data = np.random.default_rng(2).integers(0, 256, size=(5 << 19) + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(path) == expected
    assert model_hash(str(path)) == expected

    class NoHashing:
        def sha256(self):
            raise AssertionError("hashed again")

    monkeypatch.setattr(images, "hashlib", NoHashing())
    assert model_hash(path) == expected  # cached
    path.write_bytes(data[:-1])  # new size and mtime
    with pytest.raises(AssertionError, match="hashed again"):
        model_hash(path)
    monkeypatch.undo()
    assert model_hash(path) == hashlib.sha256(data[:-1]).hexdigest()[:10]


# ---- load_image -----------------------------------------------------------------------------------------

def test_load_image_resizes_down_to_multiples_of_32(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, size=(389, 517, 3), dtype=np.uint8)
    path = tmp_path / "bird.png"
    Image.fromarray(pixels).save(path)
    x, note = load_image(path)
    assert note == "resized bird.png from 517x389 to 512x384 (multiples of 32)"
    assert x.dtype == torch.float32 and x.shape == (1, 3, 384, 512)
    assert x.min() >= -1 and x.max() <= 1
    # the original script's recipe, written out with PIL directly
    ref = np.asarray(Image.fromarray(pixels).resize((512, 384), resample=Image.LANCZOS), dtype=np.float32) / 255
    ref = 2 * torch.from_numpy(ref).permute(2, 0, 1)[None] - 1
    print(f"load_image vs PIL recipe: max abs diff {(x - ref).abs().max().item():.3g}")
    assert torch.equal(x, ref)
    x64, note64 = load_image(path, multiple=64)
    assert x64.shape == (1, 3, 384, 512) and "(multiples of 64)" in note64


def test_load_image_exact_size_values_and_modes(tmp_path):
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 51)
    path = tmp_path / "exact.png"
    Image.fromarray(pixels).save(path)
    x, note = load_image(path)
    assert note is None and x.shape == (1, 3, 32, 64)
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 2 * 51 / 255 - 1], abs=1e-6)
    assert x.min() == -1 and x.max() == 1
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((40, 33), 255, np.uint8), mode="L").save(gray)
    g, note = load_image(gray)
    assert g.shape == (1, 3, 32, 32) and "from 33x40 to 32x32" in note
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(rgba)
    assert load_image(rgba)[0][0, :, 5, 5].tolist() == [1.0, -1.0, -1.0]


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path):
    """PIL's convert("RGB") clips a 16-bit grey scan at 255 (99.6% white) and a [0, 1] float TIFF to 0 (black);
    they are scaled to 8 bits by their range instead: 16-bit values by 65535, floats in [0, 1] by 1, other
    floats from their minimum to their maximum."""
    ramp = np.round(np.linspace(8000, 60000, 32 * 32)).reshape(32, 32)
    cases = [
        ("I;16", ramp.astype(np.uint16), ".png", ramp / 65535),
        ("F", ramp / 65535, ".tiff", ramp / 65535),
        ("F", ramp, ".tiff", (ramp - ramp.min()) / (ramp.max() - ramp.min())),
    ]
    for i, (mode, values, ext, expected01) in enumerate(cases):
        path = tmp_path / f"wide{i}{ext}"
        Image.fromarray(values.astype(np.float32) if mode == "F" else values).save(path)
        assert Image.open(path).mode.startswith(mode[0])
        x, note = load_image(path)
        want = np.round(expected01 * 255) / 255 * 2 - 1
        assert np.abs(x[0, 0].numpy() - want).max() < 1e-6, mode
        assert (x[0, 0] == x[0, 2]).all() and "to 8-bit" in note and path.name in note
    nan = tmp_path / "nan.tiff"
    Image.fromarray(np.full((32, 32), np.nan, np.float32)).save(nan)
    with pytest.raises(ImageError, match="NaN"):
        load_image(nan)


def test_load_image_errors(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (31, 100)).save(small)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:2000])
    for path, name in [(tmp_path / "missing.png", "missing.png"), (text, "notes.png"), (small, "small.png"),
                       (tmp_path, tmp_path.name), (truncated, "truncated.png")]:
        with pytest.raises(ImageError) as info:
            load_image(path)
        message = str(info.value)
        print(message)
        assert isinstance(info.value, ValueError) and name in message and "\n" not in message


# ---------------------------------------------------------------- interrupted writes

def test_a_failed_write_leaves_no_file_at_all(tmp_path):
    def half_then_fail(f):
        f.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        images._write_numbered(tmp_path, "", 5, "png", half_then_fail)
    assert list(tmp_path.iterdir()) == []  # neither 00000.png nor the temporary file


def test_sigkill_during_a_save_leaves_no_broken_png(tmp_path):
    """A child saves large PNGs in a loop and is killed mid-write: every PNG under an image's name decodes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = ("import sys, numpy as np; from ldm.images import save_png\n"
             "image = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)\n"
             "print('ready', flush=True)\n"
             "while True:\n    save_png(image, sys.argv[1], parameters='p', settings={})\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not any(p.suffix == ".tmp" for p in tmp_path.iterdir()):  # kill it while a file is being written
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    for png in tmp_path.glob("*.png"):
        with Image.open(png) as im:
            im.load()  # raises on a truncated file
    assert not any(p.name.endswith(".png") and p.name.startswith(".") for p in tmp_path.iterdir())


def test_sigterm_ends_a_command_as_ctrl_c():
    import os
    import signal
    import time

    from ldm.errors import INTERRUPTED, run_command

    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(command) == INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_init_image_too_large_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(images, "MAX_INIT_PIXELS", 300 * 200 - 1)  # a real 4096x4096+ file is 50 MB of test data
    with pytest.raises(images.ImageError, match="is 300x200; an init image may have at most"):
        images.load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb check: twice that raises at open
    with pytest.raises(images.ImageError, match="resize it first"):
        images.load_image(path)
