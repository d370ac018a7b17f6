"""The MiDaS DPT-Hybrid depth model: the official `depth_model.*` layout, a small forward, timm's ResNet as
a second oracle for the backbone, and (slow) the original's full-size forward."""
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE, layout_shapes
from models.midas import MiDaSInference, ResNetBackbone

PREFIX = "depth_model."
SPECIAL = REFERENCE / "special"


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_midas(seed: int) -> MiDaSInference:
    """The full-size model with small random weights (norm scales near 1), built on meta so no init runs.
    Each tensor is a window of one shared noise vector: drawing 123M fresh values costs seconds."""
    with torch.device("meta"):
        model = MiDaSInference()
    model.to_empty(device="cpu").eval()
    base = torch.randn(6 << 20, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            start = (i * 7919) % (len(base) - p.numel() + 1)
            noise = base[start:start + p.numel()].view(p.shape)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
    return model


def test_layout_matches_official_keys_and_shapes():
    expected = layout_shapes("sd2_depth", PREFIX)
    assert len(expected) == 368
    with torch.device("meta"):
        model = MiDaSInference()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: s for k, s in got.items() if expected[k] != s} == {}
    assert not list(model.buffers())  # nothing built in __init__ that a meta-device load would leave behind


def test_small_forward_shapes_and_head():
    model = _random_midas(1)
    pre_relu = []
    model.model.scratch.output_conv[4].register_forward_hook(lambda m, i, o: pre_relu.append(o))
    # Not square and not the 24x24 training grid, so the position embedding is really resized.
    images = torch.rand((2, 3, 64, 96), generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = model(images)
    assert out.shape == (2, 1, 64, 96) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()
    # The head's last ReLU is not in place: the hooked tensor is still the pre-ReLU one, and the
    # same-size bicubic resize after it is the identity.
    assert pre_relu[0].shape == (2, 1, 64, 96) and (pre_relu[0] < 0).any()
    assert torch.equal(out, pre_relu[0].clamp(min=0))
    # Each image is computed on its own: batching changes nothing.
    assert torch.allclose(model(images[1:]), out[1:], atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(images[:, :, :48])


def test_resnet_stages_match_timm():
    """timm's own ResNetV2 with the hybrid ViT's settings (the same Bottleneck in 0.4.12 and 1.x) as a
    second oracle for the 'SAME' padding, the -inf max-pool padding and the weight standardisation, at a
    size whose strided layers pad unevenly."""
    timm_resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from functools import partial

    from timm.layers import StdConv2dSame

    theirs = timm_resnetv2.ResNetV2(layers=(3, 4, 9), num_classes=0, global_pool="", preact=False,
                                    stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8)).eval()
    ours = ResNetBackbone().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 and name.endswith("weight") else 0.0))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn((1, 3, 96, 160), generator=g)
    with torch.no_grad():
        got = ours(x)
        h = theirs.stem(x)
        want = []
        for stage in theirs.stages:
            h = stage(h)
            want.append(h)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


@pytest.mark.slow  # 246 MB of weights, a 123M-parameter forward
def test_full_size_forward_matches_original(tmp_path):
    weights = tmp_path / "midas.safetensors"
    done = subprocess.run([sys.executable, str(SPECIAL / "make_midas_weights.py"), str(weights)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr  # it checks the file's sha256 itself
    state = {k[len(PREFIX):]: v.float() for k, v in load_file(weights).items()}
    with torch.device("meta"):
        model = MiDaSInference()
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()

    meta = json.loads((SPECIAL / "midas_fullsize" / "midas_forward.json").read_text())
    assert meta["input"]["x"] == "torch.rand((1,3,384,384), generator=torch.Generator().manual_seed(401))*2-1"
    x = torch.rand((1, 3, 384, 384), generator=torch.Generator().manual_seed(401)) * 2 - 1
    pre_relu = []
    model.model.scratch.output_conv[4].register_forward_hook(lambda m, i, o: pre_relu.append(o))
    start = time.perf_counter()
    out = model(x)
    seconds = time.perf_counter() - start

    ref = load_file(SPECIAL / "midas_fullsize" / "midas_forward.safetensors")
    for name, ours in (("out", out), ("head_pre_relu", pre_relu[0])):
        want = ref[name]
        assert ours.shape == want.shape
        diff, scale = (ours - want).abs().max().item(), want.abs().max().item()
        print(f"{name}: max |diff| {diff:.3g} (absmax {scale:.3g}); forward {seconds:.1f} s")
        assert diff <= 1e-4 * scale
