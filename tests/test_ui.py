"""The browser UI's API (python -m ldm ui), through gradio_client on the tiny models: every endpoint saves what
the command line saves with the same settings and seed, byte for byte; bad input is a message and the server
keeps serving; Cancel stops a run between steps; the Steps tab and PNG info work without a browser.
Skipped where the `ui` extra (gradio, gradio_client) is not installed."""
from __future__ import annotations

import argparse
import os
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REFERENCE

gr = pytest.importorskip("gradio")
client_module = pytest.importorskip("gradio_client")

SPECIAL = REFERENCE / "special"
INPUTS = SPECIAL / "inputs"
FOLDERS = {"sd1": FIXTURES["sd1_tiny"], "inpaint": SPECIAL / "sd15_inpaint_tiny", "depth": SPECIAL / "sd2_depth_tiny",
           "upscale": SPECIAL / "x4_upscaler_tiny"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI served in this process over a folder of (linked) tiny checkpoints; (client, ckpts, outdir)."""
    from ldm.ui.serve import start

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    for folder in FOLDERS.values():
        (models / folder.name).symlink_to(folder)
    outdir = tmp_path_factory.mktemp("ui-out")
    env = os.environ.get("GRADIO_TEMP_DIR")
    args = argparse.Namespace(ckpt=None, models_dir=str(models), outdir=str(outdir), host="127.0.0.1",
                              port=_free_port(), listen=False, device="cpu")
    demo, url = start(args, block=False)
    ckpts = {"sd1": f"{models}/sd1_tiny/sd1_tiny.ckpt",
             **{k: f"{models}/{FOLDERS[k].name}/{FOLDERS[k].name}.safetensors" for k in ("inpaint", "depth", "upscale")}}
    yield client_module.Client(url, verbose=False), ckpts, outdir
    demo.close()
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = env


def _same_as_the_command(result, outdir: Path, tmp_path: Path) -> None:
    """The saved PNGs equal, byte for byte, those the command line shown in the result writes."""
    from ldm.cli import main

    _, gallery, info = result
    words = shlex.split(info.split("Command line:\n")[1].splitlines()[0])
    assert words[:3] == ["python", "-m", "ldm"]
    command, argv = words[3], words[4:]
    served = Path(argv[argv.index("--outdir") + 1])
    assert served.is_relative_to(outdir)
    argv[argv.index("--outdir") + 1] = str(tmp_path)
    assert main([command, *argv]) == 0
    names = [item["caption"] for item in gallery]
    assert names and all(n.endswith(".png") for n in names if n[0].isdigit())
    for item in gallery:
        name = item["caption"]
        mine = (served / "samples" / name) if name[0].isdigit() else next(served.glob(f"{name.split()[0]}-*.png"))
        assert Path(item["image"]).read_bytes() == mine.read_bytes(), "the API returns the saved file"
        if name[0].isdigit():
            assert mine.read_bytes() == (tmp_path / "samples" / name).read_bytes(), name


def test_txt2img_endpoint_saves_the_commands_bytes(server, tmp_path):
    client, ckpts, outdir = server
    result = client.predict(prompt="a red circle at the top left", seed=1, steps=4, width=64, height=64,
                            sampler="Euler a", ckpt=ckpts["sd1"], api_name="/txt2img")
    assert "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64" in result[2]
    _same_as_the_command(result, outdir, tmp_path)


def test_the_page_reads_prompts_as_automatic1111_does(server):
    """The page takes prompts written for AUTOMATIC1111: "(red:1.0)" is "red" at weight 1, so the picture is
    that of "a red circle" (the original syntax would read the brackets as text and draw another)."""
    from ldm.images import read_settings

    client, ckpts, _ = server
    files = []
    for prompt in ("a (red:1.0) circle", "a red circle"):
        result = client.predict(prompt=prompt, seed=1, steps=2, width=64, height=64, ckpt=ckpts["sd1"],
                                api_name="/txt2img")
        assert "--prompt-syntax a1111" in result[2]
        files.append(Path(result[1][0]["image"]))
    assert all(read_settings(f)["prompt_syntax"] == "a1111" for f in files)
    same = [np.asarray(Image.open(f)) for f in files]
    assert np.array_equal(*same)


def test_img2img_endpoint(server, tmp_path):
    client, ckpts, outdir = server
    result = client.predict(prompt="a blue square", init_image=client_module.handle_file(str(INPUTS / "init.png")),
                            seed=5, steps=4, strength=0.5, n_samples=2, ckpt=ckpts["sd1"], api_name="/img2img")
    assert [item["caption"] for item in result[1]][-1] == "grid"
    _same_as_the_command(result, outdir, tmp_path)


def test_inpaint_endpoint(server, tmp_path):
    client, ckpts, outdir = server
    result = client.predict(prompt="a wooden door", init_image=client_module.handle_file(str(INPUTS / "init.png")),
                            mask=client_module.handle_file(str(INPUTS / "mask.png")), seed=0, steps=4,
                            ckpt=ckpts["inpaint"], api_name="/inpaint")
    _same_as_the_command(result, outdir, tmp_path)


def test_depth2img_endpoint_shows_the_depth(server, tmp_path):
    client, ckpts, outdir = server
    result = client.predict(prompt="a cabin", init_image=client_module.handle_file(str(INPUTS / "init.png")),
                            depth_map=client_module.handle_file(str(INPUTS / "depth.png")), seed=21, steps=4,
                            strength=0.9, ckpt=ckpts["depth"], api_name="/depth2img")
    assert result[1][-1]["caption"] == "depth used"
    _same_as_the_command(result, outdir, tmp_path)


def test_upscale_endpoint(server, tmp_path):
    client, ckpts, outdir = server
    result = client.predict(prompt="a toy", init_image=client_module.handle_file(str(INPUTS / "lowres.png")),
                            seed=33, steps=4, noise_level=20, ckpt=ckpts["upscale"], api_name="/upscale")
    _same_as_the_command(result, outdir, tmp_path)


@pytest.mark.parametrize("endpoint, kwargs, message", [
    ("/txt2img", dict(prompt=""), "Type a prompt"),
    ("/txt2img", dict(width=63), "--W 63 is not a multiple of 2"),
    ("/txt2img", dict(n_samples=1000), "at most 16"),
    ("/txt2img", dict(sampler="no such sampler"), "--sampler no such sampler"),
    ("/img2img", dict(prompt="", init_image=None), "Upload an image to start from"),
    ("/img2img", dict(init_image="not-an-image.txt"), "not-an-image.txt is not an image this page can read"),
    ("/upscale", dict(init_image="fake.png"), "fake.png is not an image this page can read"),
    ("/inpaint", dict(init_image=str(INPUTS / "init.png"), mask="fake.png", ckpt="inpaint"),
     "fake.png is not an image this page can read"),
    ("/inpaint", dict(init_image=str(INPUTS / "init.png"), mask=str(INPUTS / "mask.png"), ckpt="sd1"),
     "this tab needs an inpainting checkpoint"),
])
def test_bad_input_is_a_message_and_the_server_keeps_serving(server, tmp_path, endpoint, kwargs, message):
    client, ckpts, _ = server
    kwargs = {"prompt": "a red circle", "seed": 1, "steps": 2, "ckpt": ckpts["sd1"], **kwargs}
    if kwargs["ckpt"] in ckpts:
        kwargs["ckpt"] = ckpts[kwargs["ckpt"]]
    if endpoint == "/txt2img":
        kwargs.update(width=kwargs.get("width", 64), height=64)
    for name in ("init_image", "mask"):
        if kwargs.get(name):
            path = Path(kwargs[name])
            if not path.is_absolute():
                path = tmp_path / path
                path.write_text("hello")
            kwargs[name] = client_module.handle_file(str(path))
    with pytest.raises(Exception) as caught:
        client.predict(api_name=endpoint, **kwargs)
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1, "one line"
    ok = client.predict(prompt="a red circle", seed=2, steps=1, width=64, height=64, ckpt=ckpts["sd1"],
                        api_name="/txt2img")
    assert ok[1]


def test_cancel_stops_the_run_at_the_next_step(tmp_path):
    from ldm.ui.runs import Cancelled, Runner, argv_for

    runner = Runner()
    argv = argv_for("txt2img", str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"), tmp_path, "cpu", prompt="x", seed=1,
                    steps=20, width=64, height=64)
    run = runner.run("txt2img", argv, every=0)
    first = next(run)
    runner.cancel()
    with pytest.raises(Cancelled, match=r"step 2 of 20 of batch 1 \(Cancel came after step 1\)"):
        next(run)
    assert first.index == 0 and not (tmp_path / "txt2img-samples" / "samples").exists()


def test_steps_tab_keeps_every_step_and_exports_the_steps_commands_files(tmp_path):
    from ldm.ui.app import Page
    from ldm.ui.stepview import export, record, show

    page = Page({str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"): "sd1"}, tmp_path, "cpu")
    state = record(page, next(iter(page.checkpoints)), "a red circle", "", "DDIM", 4, 7.5, 3, 64, 64)
    assert len(state["steps"]) == 4
    first, last = show(page, state, 0), show(page, state, 3)
    assert first[0].shape == first[1].shape == (64, 64, 3) and "t = " in first[3]
    assert (first[1] != last[1]).any()
    files = export(page, state)
    assert sorted(Path(f).suffix for f in files) == [".gif", ".png"]


def test_cancel_stops_the_steps_tabs_run_too(tmp_path, one_thread):
    import re
    import threading
    import time

    from ldm.ui.app import Page
    from ldm.ui.runs import Cancelled
    from ldm.ui.stepview import record

    page = Page({str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"): "sd1"}, tmp_path, "cpu")
    caught = []

    def run():
        try:
            record(page, next(iter(page.checkpoints)), "a red circle", "", "DDIM", 200, 7.5, 3, 64, 64)
        except Cancelled as e:
            caught.append(str(e))

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while page.runner._done < 2 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    page.runner.cancel()
    worker.join(120)
    assert caught, "the run was not cancelled"
    stopped, pressed = map(int, re.search(r"step (\d+) of 200 \(Cancel came after step (\d+)\)", caught[0]).groups())
    assert pressed >= 2 and stopped - pressed <= 1, caught[0]


def test_png_info_reads_back_what_the_writer_wrote():
    from ldm.images import a1111_parameters
    from ldm.ui.pnginfo import parse_parameters

    text = a1111_parameters("a red, circle", "blurry", 5, "DPM++ 2M Karras", 7.5, 3, 64, 48, "abc", "m,x",
                            {"Denoising strength": 0.7})
    assert parse_parameters(text) == {"prompt": "a red, circle", "negative_prompt": "blurry", "steps": 5,
                                      "sampler": "DPM++ 2M Karras", "scale": 7.5, "seed": 3, "width": 64,
                                      "height": 48}


def test_the_core_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, ldm, ldm.cli, ldm.generate, ldm.special_run, ldm.filmstrip; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
