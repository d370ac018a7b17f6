"""models.layers' attention kernels against the textbook formula, and the per-shape choice between them."""
import math

import pytest
import torch

from models import layers
from models.layers import attention, attention_choice

pytestmark = pytest.mark.usefixtures("one_thread")

# bfloat16 keeps 8 bits of mantissa: outputs of size ~1 round by up to 2^-8, and the matmul kernel's
# logits are rounded too. Dropping the 1/sqrt(d) scale or a softmax row would move them by ~0.1 or more.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64 on (B, H, T, d)."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def qkv(b, h, tq, tk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for t in (tq, tk, tk)]


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty choice cache for the test, and every shape large enough to be chosen for."""
    monkeypatch.setattr(layers, "_choices", {})
    monkeypatch.setattr(layers, "TUNE_MIN_WORK", 0)
    return layers._choices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [40, 64])  # SD 1.x's first level, SD 2.x's every level
@pytest.mark.parametrize("tk", [150, 77])  # self-attention, cross-attention over a text context
@pytest.mark.parametrize("name", sorted(layers.KERNELS))
def test_each_kernel_is_softmax_attention(name, tk, d, dtype):
    q, k, v = qkv(2, 3, 150, tk, d, dtype)
    out = layers.KERNELS[name](q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert (out.double() - reference(q, k, v)).abs().max().item() < TOLERANCE[dtype]


def test_the_matmul_kernel_slices_to_the_cache_without_changing_a_number(monkeypatch):
    """64-row slices (the floor) against one slice for all 300 queries: the same rows, computed apart."""
    q, k, v = qkv(1, 2, 300, 77, 40, torch.bfloat16, seed=1)
    monkeypatch.setattr(layers, "CACHE_BYTES", 1 << 40)
    whole = layers.matmul_attention(q, k, v)
    monkeypatch.setattr(layers, "CACHE_BYTES", 1)
    assert torch.equal(layers.matmul_attention(q, k, v), whole)


@pytest.mark.parametrize("name", sorted(layers.KERNELS))
@pytest.mark.parametrize("slices", [1, 3, 7])
def test_attention_runs_the_chosen_kernel_in_every_slice(monkeypatch, fresh_choices, name, slices):
    """Whatever is chosen computes (B, T, heads * d) attention, sliced or not, and each query slice is a
    shape of its own in the cache."""
    calls = []
    monkeypatch.setattr(layers, "_rule", lambda q, k: calls.append(q.shape[2]) or name)
    q, k, v = (t.transpose(1, 2).reshape(2, t.shape[2], -1) for t in qkv(2, 4, 50, 50, 40, torch.float32, seed=2))
    out = attention(q, k, v, heads=4, slices=slices)
    heads = [t.reshape(2, 50, 4, 40).transpose(1, 2) for t in (q, k, v)]
    expected = reference(*heads).transpose(1, 2).reshape(2, 50, 160)
    assert (out.double() - expected).abs().max().item() < TOLERANCE[torch.float32]
    chunk = math.ceil(50 / slices)
    sizes = sorted({min(chunk, 50 - s) for s in range(0, 50, chunk)})
    assert sorted(calls) == sizes  # decided once per distinct slice shape
    assert sorted(key[3] for key in fresh_choices) == sizes and set(fresh_choices.values()) == {name}


def test_a_shape_is_decided_once(monkeypatch, fresh_choices):
    timed = []
    monkeypatch.setattr(layers, "_rule", lambda q, k: timed.append(q.shape) or "matmul")
    q = torch.randn(1, 30, 64)
    for _ in range(3):
        attention(q, q, q, heads=2)
    assert len(timed) == 1
    assert fresh_choices == {(torch.float32, 1, 2, 30, 30, 32, torch.get_num_threads()): "matmul"}
    attention(torch.randn(1, 31, 64), q, q, heads=2)  # another query length: another shape
    assert len(timed) == 2


class FakeClock:
    """time.perf_counter for _fastest: each kernel call advances it by that kernel's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def kernel(self, cost):
        def run(q, k, v):
            self.now += cost
            return q
        return run


@pytest.mark.parametrize("flash_cost,matmul_cost,expected", [
    (2.0, 1.0, "matmul"),  # clearly faster: chosen
    (1.0, 2.0, "flash"),
    (1.0, 0.95, "flash"),  # within the margin: the default stays
])
def test_the_fastest_kernel_is_chosen_beyond_the_margin(monkeypatch, flash_cost, matmul_cost, expected):
    clock = FakeClock()
    monkeypatch.setattr(layers.time, "perf_counter", clock)
    monkeypatch.setattr(layers, "KERNELS", {"flash": clock.kernel(flash_cost), "matmul": clock.kernel(matmul_cost)})
    q = torch.randn(1, 1, 8, 4)
    assert layers._fastest(q, q, q) == expected


def test_the_choice_is_a_rule_not_a_timing(monkeypatch, fresh_choices):
    """The same shape gets the same kernel in every run (a timed choice could differ between two runs, and
    the same seed would give other bytes): the measured rule, with no clock read."""
    monkeypatch.setattr(layers, "_fastest", lambda *a: pytest.fail("timed"))
    cross = qkv(2, 8, 1024, 77, 40, torch.float32)
    self_ = qkv(2, 8, 256, 256, 40, torch.float32)
    assert attention_choice(*cross) == "matmul" and attention_choice(*self_) == "flash"
    assert attention_choice(*[t.bfloat16() for t in cross]) == "flash"


@pytest.mark.parametrize("case", ["float16", "grad", "small", "meta"])
def test_the_default_runs_where_no_choice_is_made(monkeypatch, case):
    """float16 (the matmul kernel's fp16 logits could overflow), gradients, shapes too small to matter and
    other devices take F.scaled_dot_product_attention without timing anything."""
    monkeypatch.setattr(layers, "_choices", {})
    monkeypatch.setattr(layers, "_rule", lambda *a: pytest.fail("decided"))
    q = torch.randn(1, 2, 16, 8)
    if case == "float16":
        monkeypatch.setattr(layers, "TUNE_MIN_WORK", 0)
        q = q.half()
    elif case == "grad":
        monkeypatch.setattr(layers, "TUNE_MIN_WORK", 0)
        q.requires_grad_(True)
    elif case == "meta":
        monkeypatch.setattr(layers, "TUNE_MIN_WORK", 0)
        q = q.to("meta")
    assert attention_choice(q, q, q) == layers.DEFAULT and layers._choices == {}


def test_a_real_choice_on_a_step_sized_shape_is_a_kernel_and_is_kept(monkeypatch):
    """Without fakes: the SD 1.x cross-attention shape (a few rows of it) gets one of the kernels, once."""
    monkeypatch.setattr(layers, "_choices", {})
    q, k, v = qkv(2, 8, 1024, 77, 40, torch.bfloat16)
    name = attention_choice(q, k, v)
    assert name in layers.KERNELS and list(layers.attention_choices().values()) == [name]
    monkeypatch.setattr(layers, "_rule", lambda *a: pytest.fail("decided twice"))
    assert attention_choice(q, k, v) == name == "flash"
