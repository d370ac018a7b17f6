"""Full-size random checkpoints through the real entry points (slow: minutes, GBs of RAM)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT.parent / "shared" / "reference" / "layouts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sd1-random.safetensors"
    subprocess.run([sys.executable, ROOT / "tools" / "make_checkpoint.py", path, "--layout", LAYOUTS / "sd1.json"],
                   check=True)
    return path


def _txt2img(ckpt, outdir, steps, dtype):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, ROOT / "tools" / "txt2img.py", "--prompt", "hello world", "--ckpt", ckpt,
                             "--skip_grid", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", str(steps),
                             "--device", "cpu", "--dtype", dtype, "--outdir", outdir],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return time.perf_counter() - start


def test_txt2img_512_on_this_cpu(sd1_checkpoint, tmp_path):
    """The original README's command on a full-size SD 1.x file; one step's cost = (2 steps) - (1 step)."""
    one = _txt2img(sd1_checkpoint, tmp_path, 1, "float32")
    two = _txt2img(sd1_checkpoint, tmp_path, 2, "float32")
    print(f"float32 512x512: 1 step {one:.1f} s, 2 steps {two:.1f} s total -> {two - one:.1f} s per CFG step")
    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
