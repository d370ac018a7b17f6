"""Samplers against the original implementation's recorded runs (replayed UNet calls) and diffusers.

The replay model stands in for the UNet: on its k-th call it checks its inputs against the k-th
call the original sampler made and returns the output the original UNet gave. So the sampler
math, the guidance batching, the call count and the RNG order are tested without any UNet.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from conftest import _fixture_state, fixture_config, fixture_meta, fixture_tensors
from samplers import (UPSCALER_LINEAR, alphas_cumprod_from, ddim_schedule, ddim_sigmas, ddim_start, ddim_steps,
                      ddim_timesteps, drain, linear_alphas_cumprod, make_denoiser, plms_steps, stochastic_encode)
from samplers.registry import REGISTRY

SAMPLERS = {name: REGISTRY[name].fn for name in ("ddim", "plms")}

MODELS = ["sd1_tiny", "sd2_tiny", "sd2v_tiny"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SAMPLER_TOL = 1e-3    # README: sampler latents reach ~50; thread count alone moves them by ~2e-4
CALL_TOL = 1e-4
AC = linear_alphas_cumprod()
S10 = ddim_schedule(AC, 10)
DIFFUSERS_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                       set_alpha_to_one=False)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


class Replay:
    """A stand-in UNet that asserts each call's inputs equal the recorded ones and returns the recorded output."""

    def __init__(self, rec: dict, context: torch.Tensor, device: str):
        self.rec, self.context, self.device = rec, context, device
        self.expected = len([k for k in rec if k.startswith("calls.") and k.endswith(".x_in")])
        self.calls, self.max_x_diff = 0, 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k = self.calls
        assert k < self.expected, f"more UNet calls than the original's {self.expected}"
        p = f"calls.{k:02d}."
        assert x.device.type == self.device and t.dtype == torch.long
        assert torch.equal(t.cpu(), self.rec[p + "t_in"]), (k, t, self.rec[p + "t_in"])
        assert torch.equal(context.cpu(), self.context), f"call {k}: context is not cat([uc, c])"
        d = _max_diff(x, self.rec[p + "x_in"])
        assert d <= CALL_TOL, f"call {k}: x_in differs by {d}"
        self.max_x_diff = max(self.max_x_diff, d)
        self.calls += 1
        return self.rec[p + "model_out"].to(self.device)


def _replay_run(name: str, stem: str, device: str):
    rec, meta = fixture_tensors(name, stem), fixture_meta(name, stem)
    assert meta["ddim_discretize"] == "uniform" and meta["guidance_scale"] == 7.5
    model = Replay(rec, torch.cat([rec["uc"], rec["c"]]), device)
    ac = alphas_cumprod_from(_fixture_state(name))
    denoise = make_denoiser(model, rec["c"].to(device), rec["uc"].to(device), meta["guidance_scale"],
                            meta["parameterization"], ac)
    # eta > 0 runs seed the global RNG right before sampler.sample(); x_T is given, so the per-step
    # noise is the only draw: the same stream as a fresh CPU generator with that seed.
    generator = torch.Generator().manual_seed(1234) if "seed1234" in stem else None
    steps = SAMPLERS["plms" if stem == "plms" else "ddim"](
        denoise, rec["x_T"].to(device), ddim_schedule(ac, meta["S"]), eta=meta["eta"], generator=generator)
    return rec, model, list(steps)


# ---------------------------------------------------------------- 1. schedules
@pytest.mark.parametrize("name", MODELS)
def test_linear_schedule_equals_checkpoint_buffer(name):
    cfg = fixture_config(name)
    buffer = _fixture_state(name)["alphas_cumprod"]
    built = linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps)
    assert built.dtype == torch.float32 and torch.equal(built, buffer)
    assert torch.equal(alphas_cumprod_from(_fixture_state(name)), buffer)
    assert torch.equal(alphas_cumprod_from({}, linear_start=cfg.linear_start, linear_end=cfg.linear_end), buffer)


@pytest.mark.parametrize("start,end", [(0.00085, 0.012), UPSCALER_LINEAR])
def test_linear_schedule_matches_diffusers(start, end):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=start, beta_end=end).alphas_cumprod
    # diffusers builds it in float32, the original in float64: a few float32 ulps apart
    assert _max_diff(linear_alphas_cumprod(start, end), ref) <= 1e-6


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stem", ["ddim_eta0", "ddim_eta0.5_seed1234"])
def test_ddim_schedule_matches_original(name, stem):
    rec, meta = fixture_tensors(name, stem), fixture_meta(name, stem)
    s = ddim_schedule(alphas_cumprod_from(_fixture_state(name)), meta["S"])
    assert torch.equal(s.timesteps, rec["schedule.ddim_timesteps"])
    assert torch.equal(s.alphas, rec["schedule.ddim_alphas"])
    assert torch.equal(s.alphas_prev.double(), rec["schedule.ddim_alphas_prev"])
    assert _max_diff(ddim_sigmas(s, meta["eta"]), rec["schedule.ddim_sigmas"]) <= 1e-7   # float32 rounding of float64 σ


@pytest.mark.parametrize("S", [1, 2, 3, 7, 10, 50, 333, 500, 501, 1000])
def test_uniform_spacing_keeps_the_original_step_count(S):
    original = np.asarray(list(range(0, 1000, 1000 // S))) + 1     # make_ddim_timesteps, "uniform"
    if original[-1] >= 1000:            # the original indexes alphas_cumprod[1000] and fails
        with pytest.raises(ValueError, match="past the schedule"):
            ddim_timesteps(S)
        return
    assert ddim_timesteps(S).tolist() == original.tolist()
    assert len(list(ddim_steps(lambda x, t: (x, x), torch.zeros(1), ddim_schedule(AC, S)))) == len(original)


# ---------------------------------------------------------------- 2. the original runs, replayed
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,stem", [(m, s) for m in MODELS for s in ("ddim_eta0", "ddim_eta0.5_seed1234", "plms")
                                       if not (m == "sd2v_tiny" and s == "plms")])
def test_replay_matches_original(name, stem, device):
    rec, model, steps = _replay_run(name, stem, device)
    assert model.calls == model.expected                      # 10 for DDIM, 11 for PLMS
    assert len(steps) == 10
    assert steps[-1].x_next.device.type == device and steps[-1].x_next.dtype == torch.float32
    # intermediates: [x_T, after the first step, after the last step]
    assert _max_diff(steps[0].x_next, rec["intermediates.x_inter.1"]) <= SAMPLER_TOL
    assert _max_diff(steps[0].pred_x0, rec["intermediates.pred_x0.1"]) <= SAMPLER_TOL
    assert _max_diff(steps[-1].pred_x0, rec["intermediates.pred_x0.2"]) <= SAMPLER_TOL
    assert _max_diff(steps[-1].x_next, rec["samples"]) <= SAMPLER_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_img2img_stochastic_encode_and_decode_match_original(name, device):
    rec, meta = fixture_tensors(name, "img2img"), fixture_meta(name, "img2img")
    ac = alphas_cumprod_from(_fixture_state(name))
    g = torch.Generator().manual_seed(31)
    torch.randn(rec["posterior_mean"].shape, generator=g)     # draw #1: the VAE posterior sample
    z_enc = stochastic_encode(rec["init_latent"].to(device), ac, 10, 7, generator=g)   # draw #2
    assert _max_diff(z_enc, rec["z_enc"]) <= CALL_TOL

    model = Replay(rec, torch.cat([rec["uc"], rec["c"]]), device)
    denoise = make_denoiser(model, rec["c"].to(device), rec["uc"].to(device), 7.5, meta["parameterization"], ac)
    steps = list(ddim_steps(denoise, z_enc, ddim_schedule(ac, 10)[:7]))
    assert model.calls == model.expected == 7
    assert [s.t for s in steps] == [601, 501, 401, 301, 201, 101, 1]
    assert _max_diff(steps[-1].x_next, rec["samples"]) <= SAMPLER_TOL


# ---------------------------------------------------------------- 3. diffusers' schedulers
def _synthetic_eps(x, t, context):
    return 0.1 * x + torch.sin(t.double()).float().view(-1, 1, 1, 1)


def _synthetic_v(x, t, context):
    return -0.2 * x + 0.5 * torch.cos(t.double()).float().view(-1, 1, 1, 1)


def _x(seed=0):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def _with_our_alphas(sched):
    """diffusers rebuilds ᾱ in float32 (see test_linear_schedule_matches_diffusers): give it ours so
    that what is compared is the algorithm."""
    sched.alphas_cumprod, sched.final_alpha_cumprod = AC.clone(), AC[0].clone()
    return sched


def _diffusers_run(sched, model, x, S, **step_kwargs):
    sched.set_timesteps(S)
    traj = []
    for t in sched.timesteps:
        out = model(x, t.view(1).repeat(x.shape[0]), None)
        kw = {k: (v() if callable(v) else v) for k, v in step_kwargs.items()}
        x = sched.step(out, t, x, **kw).prev_sample
        traj.append(x)
    return traj


@pytest.mark.parametrize("S", [10, 50])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_eta0_matches_diffusers(S, parameterization):
    model = _synthetic_eps if parameterization == "eps" else _synthetic_v
    prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    sched = _with_our_alphas(DDIMScheduler(clip_sample=False, prediction_type=prediction_type, **DIFFUSERS_BETAS))
    traj = _diffusers_run(sched, model, _x(), S, eta=0.0)
    denoise = make_denoiser(model, torch.zeros(2, 1), None, 1.0, parameterization, AC)
    steps = list(ddim_steps(denoise, _x(), ddim_schedule(AC, S)))
    assert [s.t for s in steps] == sched.timesteps.tolist()
    assert max(_max_diff(s.x_next, y) for s, y in zip(steps, traj)) <= CALL_TOL


def test_ddim_eta_half_matches_diffusers_with_the_same_noise():
    twin = torch.Generator().manual_seed(7)    # feeds diffusers the draws our sampler makes
    sched = _with_our_alphas(DDIMScheduler(clip_sample=False, **DIFFUSERS_BETAS))
    traj = _diffusers_run(sched, _synthetic_eps, _x(), 10, eta=0.5,
                          variance_noise=lambda: torch.randn((2, 4, 8, 8), generator=twin))
    denoise = make_denoiser(_synthetic_eps, torch.zeros(2, 1), None, 1.0, "eps", AC)
    steps = list(ddim_steps(denoise, _x(), S10, eta=0.5, generator=torch.Generator().manual_seed(7)))
    assert max(_max_diff(s.x_next, y) for s, y in zip(steps, traj)) <= CALL_TOL


@pytest.mark.parametrize("S", [10, 50])
def test_plms_matches_diffusers_pndm(S):
    """diffusers' PNDM with skip_prk_steps is the original PLMS, first step included: its timesteps
    repeat the second one ([901, 801, 801, 701, ...]) for the improved-Euler evaluation, and its
    first `step` returns that Euler intermediate; every later sample is ours."""
    calls = []
    model = lambda x, t, c: calls.append(int(t[0])) or _synthetic_eps(x, t, c)
    sched = _with_our_alphas(PNDMScheduler(skip_prk_steps=True, **DIFFUSERS_BETAS))
    traj = _diffusers_run(sched, model, _x(), S)
    diffusers_calls, calls[:] = list(calls), []
    steps = list(plms_steps(make_denoiser(model, torch.zeros(2, 1), None, 1.0, "eps", AC), _x(), ddim_schedule(AC, S)))
    assert calls == diffusers_calls and len(calls) == S + 1
    assert len(steps) == S
    assert max(_max_diff(s.x_next, y) for s, y in zip(steps, traj[1:])) <= CALL_TOL


def test_plms_on_a_v_model_equals_plms_on_its_eps_twin():
    """The original PLMS refuses v models. Ours turns each v̂ into ε̂ at its own (x, t), so on a v
    model it must equal diffusers' PNDM on the eps model that makes the same predictions."""
    def eps_twin(x, t, c):
        a = AC[t].view(-1, 1, 1, 1)
        return a.sqrt() * _synthetic_v(x, t, c) + (1 - a).sqrt() * x
    traj = _diffusers_run(_with_our_alphas(PNDMScheduler(skip_prk_steps=True, **DIFFUSERS_BETAS)), eps_twin, _x(), 10)
    ours = drain(plms_steps(make_denoiser(_synthetic_v, torch.zeros(2, 1), None, 1.0, "v", AC), _x(), S10), None)
    assert _max_diff(ours, traj[-1]) <= CALL_TOL


# ---------------------------------------------------------------- 4. the Step generator contract
class Counting:
    def __init__(self, fn=_synthetic_eps):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, c):
        self.calls += 1
        return self.fn(x, t, c)


def _denoise(model=_synthetic_eps):
    return make_denoiser(model, torch.zeros(2, 1), None, 1.0, "eps", AC)


@pytest.mark.parametrize("name", ["ddim", "plms"])
@pytest.mark.parametrize("S", [7, 10])
def test_yields_one_step_per_timestep(name, S):
    ts = ddim_timesteps(S).tolist()
    steps = list(SAMPLERS[name](_denoise(), _x(), ddim_schedule(AC, S)))
    assert [s.index for s in steps] == list(range(len(ts))) and all(s.total == len(ts) for s in steps)
    assert [s.t for s in steps] == ts[::-1]
    assert [s.t_next for s in steps] == ts[::-1][1:] + [0]
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("steps_fn", [ddim_steps, plms_steps])
def test_draining_ends_on_the_last_step_and_leaves_x_alone(steps_fn):
    x = _x()
    before = x.clone()
    drained = drain(steps_fn(_denoise(), x, S10, generator=torch.Generator().manual_seed(3)), x)
    steps = list(steps_fn(_denoise(), x, S10, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(steps[-1].x_next, drained) and not torch.equal(drained, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name,calls", [("ddim", 3), ("plms", 4)])
def test_break_stops_the_model_calls(name, calls):
    model = Counting()
    for step in SAMPLERS[name](_denoise(model), _x(), S10):
        if step.index == 2:
            break
    assert model.calls == calls


def test_replacing_x_next_steers_ddim():
    """DDIM is Markov in x: continuing from a replaced x_next equals a fresh run from it."""
    replaced = _x(seed=5)
    gen = ddim_steps(_denoise(), _x(), S10)
    for step in gen:
        if step.index == 3:
            step.x_next = replaced
            break
    rest = list(gen)
    assert rest[0].x is replaced and len(rest) == 6
    assert torch.equal(rest[-1].x_next, drain(ddim_steps(_denoise(), replaced, S10[:6]), None))
    assert _max_diff(rest[-1].x_next, drain(ddim_steps(_denoise(), _x(), S10), None)) > 1e-2


def test_replacing_x_next_steers_plms():
    replaced = _x(seed=5)
    gen = plms_steps(_denoise(), _x(), S10)
    for step in gen:
        if step.index == 3:
            step.x_next = replaced
            break
    rest = list(gen)
    assert rest[0].x is replaced and len(rest) == 6
    assert _max_diff(rest[-1].x_next, drain(plms_steps(_denoise(), _x(), S10), None)) > 1e-2


@pytest.mark.parametrize("name,draws", [("ddim", 10), ("plms", 11)])
def test_rng_stream_advances_as_the_original(name, draws):
    """A draw per DDIM update even at η = 0 (PLMS: two in its first step), as the original."""
    g, ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drain(SAMPLERS[name](_denoise(), _x(), S10, generator=g), _x())
    for _ in range(draws):
        torch.randn((2, 4, 8, 8), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_argument_checks():
    with pytest.raises(ValueError, match="eta"):
        list(ddim_steps(_denoise(), _x(), S10, eta=-0.1))
    with pytest.raises(ValueError, match="eta"):
        list(plms_steps(_denoise(), _x(), S10, eta=0.5))
    with pytest.raises(ValueError, match="t_start"):
        ddim_start(_x(), S10, _x(), t_start=11)
    x, empty = ddim_start(_x(), S10, t_start=0)
    assert len(empty) == 0 and torch.equal(drain(ddim_steps(_denoise(), x, empty), x), _x())


def test_img2img_start_is_the_original_stochastic_encode_and_the_last_t_start_steps():
    """x0 noised to DDIM step t_start (one step above the first step run, as the original's img2img),
    then schedule[:t_start]; at t_start = S, where the original indexes past its table, the top step."""
    x0, noise = torch.full((2, 4, 8, 8), 0.5), _x()
    x, sched = ddim_start(noise, S10, x0, t_start=7)
    assert torch.equal(x, stochastic_encode(x0, AC, 10, 7, noise=noise))
    assert sched.timesteps.tolist() == ddim_timesteps(10)[:7].tolist()
    x, sched = ddim_start(noise, S10, x0, t_start=10)
    assert torch.equal(x, stochastic_encode(x0, AC, 10, 9, noise=noise)) and len(sched) == 10


# ---------------------------------------------------------------- 5. the denoiser
def test_unguided_is_one_call_on_cond():
    seen = []
    model = lambda x, t, c: seen.append((x.shape[0], c)) or _synthetic_eps(x, t, c)
    cond, uncond = torch.ones(2, 3), torch.zeros(2, 3)
    for u, scale in [(None, 7.5), (uncond, 1.0)]:
        seen.clear()
        make_denoiser(model, cond, u, scale, "eps", AC)(_x(), 501)
        assert len(seen) == 1 and seen[0][0] == 2 and seen[0][1] is cond


def test_guidance_is_one_batched_call():
    seen = []
    def model(x, t, c):
        seen.append((x, t, c))
        return torch.cat([torch.full_like(x[:2], 1.0), torch.full_like(x[:2], 3.0)])
    x, cond, uncond = _x(), torch.ones(2, 3), torch.zeros(2, 3)
    eps, _ = make_denoiser(model, cond, uncond, 7.5, "eps", AC)(x, 501)
    (xi, ti, ci), = seen
    assert torch.equal(xi, torch.cat([x, x])) and ti.tolist() == [501] * 4 and torch.equal(ci, torch.cat([uncond, cond]))
    assert torch.all(eps == 1.0 + 7.5 * (3.0 - 1.0))


def test_dtype_boundary_and_dict_conditioning():
    """The model gets its dtype (floating tensors only); the sampler gets float32 back."""
    def model(x, t, context, y):
        assert x.dtype == torch.bfloat16 and context.dtype == torch.bfloat16
        assert y.dtype == torch.long and y.tolist() == [0, 0, 5, 5]
        return x * 0.5
    cond = {"c_crossattn": torch.ones(2, 3), "y": torch.full((2,), 5)}
    uncond = {"c_crossattn": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.long)}
    eps, pred_x0 = make_denoiser(model, cond, uncond, 7.5, "eps", AC, dtype=torch.bfloat16)(_x(), 501)
    assert eps.dtype == pred_x0.dtype == torch.float32


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_eps_and_pred_x0_reconstruct_x(parameterization):
    """x_t = √ᾱ_t x̂0 + √(1-ᾱ_t) ε̂ holds for both parameterisations, at each sample's own t."""
    x, t = _x(), torch.tensor([1, 901])
    eps, x0 = make_denoiser(_synthetic_v, torch.zeros(2, 1), None, 1.0, parameterization, AC)(x, t)
    a = AC[t].view(-1, 1, 1, 1)
    assert _max_diff(a.sqrt() * x0 + (1 - a).sqrt() * eps, x) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_cuda_follows_the_cpu_noise(name):
    """Noise comes from the CPU generator, so a seed gives the same latents on the GPU."""
    eta = 0.5 if name == "ddim" else 0.0
    out = {}
    for device in ("cpu", "cuda"):
        steps = SAMPLERS[name](_denoise(), _x().to(device), S10, eta=eta, generator=torch.Generator().manual_seed(1))
        out[device] = drain(steps, _x())
    assert out["cuda"].device.type == "cuda"
    assert _max_diff(out["cuda"], out["cpu"]) <= CALL_TOL
