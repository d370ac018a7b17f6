"""The k-diffusion sampler family (sigma space), DDPM, the sigma denoiser, the noise helpers and the registry.

References: diffusers' schedulers driven by the same model function and the same noise (their
sigmas are checked equal to ours first), and closed-form cases (an oracle denoiser, Gaussian data).
Where diffusers differs by design the test says how, and checks that this is the only difference.
"""
from __future__ import annotations

import inspect
import math
import types

import numpy as np
import pytest
import torch
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler)
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler   # the real class, not the scipy dummy

import samplers.noise
from samplers import (REGISTRY, BrownianNoise, Step, available, ddim_schedule, ddim_steps, ddim_timesteps,
                      ddpm_steps, denoiser_for, dpm2_ancestral_steps, dpm2_steps, dpmpp_2m_steps,
                      dpmpp_2s_ancestral_steps, dpmpp_sde_steps, drain, euler_ancestral_steps, euler_steps,
                      get_sigmas, heun_steps, linear_alphas_cumprod, lms_coefficient, lms_steps, make_denoiser,
                      make_sigma_denoiser, model_sigmas, noise_like, randn, register, resolve_sampler, sigma_start,
                      sigma_to_t, start_for, stochastic_encode)
from samplers.registry import ALIASES

AC = linear_alphas_cumprod()
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
N = 10          # linspace(0, 999, 10) are whole timesteps: diffusers' linear σ interpolation equals our log one
SHAPE = (2, 4, 8, 8)
TOL = 1e-4
COND = torch.zeros(2, 1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers on numpy 2


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def eps_model(x, t, c):
    """A smooth stand-in UNet, nonlinear in x and in the (fractional) timestep; elementwise per sample."""
    t = t.double().view(-1, 1, 1, 1)
    return (0.3 * torch.tanh(x) * torch.cos(t / 300) + 0.2 * torch.sin(t / 70)).float()


def v_model(x, t, c):
    t = t.double().view(-1, 1, 1, 1)
    return (-0.4 * torch.tanh(x) + 0.3 * torch.cos(t / 90)).float()


MODELS = {"eps": (eps_model, "epsilon"), "v": (v_model, "v_prediction")}


def _noise(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed) if seed is not None else None


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fn(*a)


def _ours(fn, param, schedule, *, seed=None, quantize=False, n=N, model=None, **kw):
    model = Counting(model or MODELS[param][0])
    denoise = make_sigma_denoiser(model, COND, None, 1.0, param, AC, quantize=quantize)
    sigmas = get_sigmas(AC, n, schedule)
    x = drain(fn(denoise, _noise() * sigmas[0].item(), sigmas, generator=_gen(seed), **kw), None)
    return x, sigmas, model.calls


def _drive(sched, model, x, seed=None):
    """diffusers' loop: scale_model_input, model(x_in, t), step; the same seed feeds its noise draws."""
    kw = {"generator": _gen(seed)} if seed is not None else {}
    model = Counting(model)
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]), None)
        x = sched.step(out, t, x, **kw).prev_sample
    return x, model.calls


def _with_our_alphas(sched):
    """diffusers builds ᾱ in float32, the original (and we) in float64 then float32: give it ours so that
    what is compared is the algorithm."""
    sched.alphas_cumprod = AC.clone()
    return sched


def _assert_same_sigmas(theirs, ours):
    theirs = theirs.unique_consecutive()
    assert len(theirs) == len(ours) and torch.allclose(theirs.double(), ours.double(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- diffusers schedulers as references
def _k_scheduler(cls, pt, schedule, **kw):
    sched = _with_our_alphas(cls(prediction_type=pt, timestep_spacing="linspace",
                                 use_karras_sigmas=schedule == "karras", **BETAS, **kw))
    sched.set_timesteps(N)
    return sched


def _euler_a_scheduler(pt, schedule):
    """EulerAncestralDiscreteScheduler has no `use_karras_sigmas`: it gets EulerDiscrete's karras sigmas."""
    sched = _with_our_alphas(EulerAncestralDiscreteScheduler(prediction_type=pt, timestep_spacing="linspace", **BETAS))
    sched.set_timesteps(N)
    if schedule == "karras":
        donor = _k_scheduler(EulerDiscreteScheduler, pt, schedule)
        sched.sigmas, sched.timesteps = donor.sigmas.clone(), donor.timesteps.clone()
    return sched


def _kdpm2_scheduler(cls, pt, schedule):
    """diffusers' KDPM2 rounds the timesteps of the main σ (not of the midpoints) with karras sigmas, so
    the UNet sees round(t(σ)) there; k-diffusion does not. We check that the rounding is the only
    difference (theirs = round(t(σ)) of the same σ) and give it back the fractional t."""
    sched = _k_scheduler(cls, pt, schedule)
    if schedule == "karras":
        main = sched.sigmas.unique_consecutive()[:-1].numpy()
        t = np.array([sched._sigma_to_t(s, sched.log_sigmas.numpy()) for s in main])
        assert np.array_equal(sched.timesteps[0::2].numpy(), t.round()) and not np.array_equal(t, t.round())
        sched.timesteps[0::2] = torch.from_numpy(t)
    return sched


@pytest.fixture
def scipy_free_lms(monkeypatch):
    """diffusers' LMS integrates its coefficients with scipy's `quad`, which is not installed here: Simpson's
    rule on 200 panels stands in (exact for the cubic Lagrange polynomials of order 4)."""
    def quad(f, a, b, epsrel=None):
        xs = np.linspace(a, b, 201)
        ys = np.array([f(v) for v in xs])
        return (b - a) / 600 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum()), 0.0
    monkeypatch.setattr(scheduling_lms_discrete, "integrate", types.SimpleNamespace(quad=quad), raising=False)


# name -> (our function, diffusers scheduler factory, seed for the noise or None)
K_CASES = {
    "euler": (euler_steps, lambda pt, s: _k_scheduler(EulerDiscreteScheduler, pt, s), None),
    "euler_a": (euler_ancestral_steps, _euler_a_scheduler, 5),
    "heun": (heun_steps, lambda pt, s: _k_scheduler(HeunDiscreteScheduler, pt, s), None),
    "dpm2": (dpm2_steps, lambda pt, s: _kdpm2_scheduler(KDPM2DiscreteScheduler, pt, s), None),
    "dpm2_a": (dpm2_ancestral_steps, lambda pt, s: _kdpm2_scheduler(KDPM2AncestralDiscreteScheduler, pt, s), 5),
    "lms": (lms_steps, lambda pt, s: _k_scheduler(LMSDiscreteScheduler, pt, s), None),
}
CALLS = {"euler": N, "euler_a": N, "heun": 2 * N - 1, "dpm2": 2 * N - 1, "dpm2_a": 2 * N - 1, "lms": N}


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("name", list(K_CASES))
def test_matches_diffusers_k_schedulers(name, schedule, param, scipy_free_lms):
    fn, make, seed = K_CASES[name]
    model, pt = MODELS[param]
    sched = make(pt, schedule)
    ref, ref_calls = _drive(sched, model, _noise() * sched.init_noise_sigma, seed)
    ours, sigmas, calls = _ours(fn, param, schedule, seed=seed)
    _assert_same_sigmas(sched.sigmas, sigmas)
    assert calls == ref_calls == CALLS[name]
    assert _max_diff(ours, ref) <= TOL


def _vp_start(sigma_max: float) -> torch.Tensor:
    """The DPM-Solver schedulers run on the VP latent x_σ / √(σ² + 1) and diffusers starts them at
    unit noise; k-diffusion (and we) start at x_σ = σ_max z. Same z, same point: σ_max z / √(σ_max² + 1)."""
    return _noise() * (sigma_max / (sigma_max ** 2 + 1) ** 0.5)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
def test_dpmpp_2m_matches_diffusers_multistep(schedule, param):
    """DPMSolverMultistep(dpmsolver++, order 2). Its own "linspace" drops t = 0 (n + 1 points), so the
    discrete run is given our timesteps; with karras sigmas it rounds the timesteps the UNet sees,
    which is our `quantize=True` (k-diffusion's quantized CompVisDenoiser)."""
    model, pt = MODELS[param]
    sched = _with_our_alphas(DPMSolverMultistepScheduler(prediction_type=pt, algorithm_type="dpmsolver++",
                                                         solver_order=2, use_karras_sigmas=schedule == "karras",
                                                         **BETAS))
    if schedule == "karras":
        sched.set_timesteps(N)
    else:
        sched.set_timesteps(timesteps=list(range(999, -1, -111)))
    sigmas = get_sigmas(AC, N, schedule)
    quantize = schedule == "karras"
    if quantize:
        assert sched.timesteps.tolist() == sigma_to_t(sigmas[:-1], model_sigmas(AC).log(), True).long().tolist()
    _assert_same_sigmas(sched.sigmas, sigmas)
    ref, ref_calls = _drive(sched, model, _vp_start(sigmas[0].item()))
    ours, _, calls = _ours(dpmpp_2m_steps, param, schedule, quantize=quantize)
    assert calls == ref_calls == N
    assert _max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("fn", [dpmpp_2s_ancestral_steps, dpmpp_sde_steps])
def test_dpmpp_2s_at_eta0_matches_diffusers_singlestep(fn, schedule, param):
    """DPM++ 2S (k-diffusion's 2S ancestral or SDE at η = 0) is DPMSolverSinglestep(dpmsolver++, order 2)
    on the schedule σ_0, √(σ_0 σ_1), σ_1, √(σ_1 σ_2), ..., σ_{n-1}, 0: each pair of its steps is one of
    ours (first order to the log-midpoint, then second order with r = 1/2), and its last step, first
    order to 0, is our final Euler step. diffusers cannot be given such a schedule, so it is set on
    the scheduler after `set_timesteps`, with the fractional t(σ) of diffusers' own `_sigma_to_t`."""
    model, pt = MODELS[param]
    sigmas = get_sigmas(AC, N, schedule).tolist()
    interleaved = [v for a, b in zip(sigmas[:-2], sigmas[1:-1]) for v in (a, math.sqrt(a * b))] + sigmas[-2:]
    sched = _with_our_alphas(DPMSolverSinglestepScheduler(prediction_type=pt, algorithm_type="dpmsolver++",
                                                          solver_order=2, lower_order_final=True, **BETAS))
    sched.set_timesteps(len(interleaved) - 1)
    assert sched.order_list == [1, 2] * (N - 1) + [1]
    log_sigmas = np.log(model_sigmas(AC).double().numpy())
    sched.sigmas = torch.tensor(interleaved, dtype=torch.float32)
    sched.timesteps = torch.tensor([float(sched._sigma_to_t(np.array(s), log_sigmas)) for s in interleaved[:-1]])
    ref, ref_calls = _drive(sched, model, _vp_start(sigmas[0]))
    ours, _, calls = _ours(fn, param, schedule, eta=0.0)
    assert calls == ref_calls == 2 * N - 1
    assert _max_diff(ours, ref) <= TOL


def test_ddpm_matches_diffusers():
    """DDPMScheduler(fixed_small) with the original's timesteps ("leading" + 1) and the same noise draws."""
    sched = _with_our_alphas(DDPMScheduler(variance_type="fixed_small", clip_sample=False, steps_offset=1,
                                           timestep_spacing="leading", **BETAS))
    sched.set_timesteps(N)
    ref, _ = _drive(sched, eps_model, _noise(), seed=3)
    model = Counting(eps_model)
    steps = list(ddpm_steps(make_denoiser(model, COND, None, 1.0, "eps", AC), _noise(), ddim_schedule(AC, N),
                            generator=_gen(3)))
    assert [s.t for s in steps] == sched.timesteps.tolist() and model.calls == N
    assert _max_diff(steps[-1].x_next, ref) <= TOL


def test_ddpm_is_ddim_eta1_but_the_last_step():
    """The posterior of eq. 6-7 is DDIM's η = 1 step (Song et al. 2021, eq. 16); DDPM's last step lands on
    ᾱ = 1 (x̂0, no noise) where DDIM's lands on ᾱ_0."""
    denoise = make_denoiser(eps_model, COND, None, 1.0, "eps", AC)
    ddpm = list(ddpm_steps(denoise, _noise(), ddim_schedule(AC, N), generator=_gen(4)))
    ddim = list(ddim_steps(denoise, _noise(), ddim_schedule(AC, N), eta=1.0, generator=_gen(4)))
    assert max(_max_diff(a.x_next, b.x_next) for a, b in zip(ddpm[:-1], ddim[:-1])) <= TOL   # float32 rounding
    assert _max_diff(ddpm[-1].x_next, ddpm[-1].pred_x0) <= 1e-5 and _max_diff(ddpm[-1].x_next, ddim[-1].x_next) > 1e-3


# ---------------------------------------------------------------- sigmas
@pytest.mark.parametrize("n", [10, 28, 1000])
def test_discrete_sigmas_equal_diffusers_linspace(n):
    """k-diffusion's DiscreteSchedule interpolates log σ, diffusers σ: equal where the t are whole numbers."""
    sched = _with_our_alphas(EulerDiscreteScheduler(timestep_spacing="linspace", **BETAS))
    sched.set_timesteps(n)
    ours = get_sigmas(AC, n, "normal")
    assert ours[-1] == 0 and len(ours) == n + 1
    assert torch.allclose(sched.sigmas.double(), ours.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("n", [2, 7, 30])
def test_karras_and_exponential_sigmas_equal_diffusers(schedule, n):
    sched = _with_our_alphas(EulerDiscreteScheduler(timestep_spacing="linspace", **BETAS,
                                                    **{f"use_{schedule}_sigmas": True}))
    sched.set_timesteps(n)
    ours = get_sigmas(AC, n, schedule)
    ms = model_sigmas(AC)
    assert math.isclose(ours[0].item(), ms[-1].item(), rel_tol=1e-6) and math.isclose(ours[-2].item(), ms[0].item(), rel_tol=1e-6)
    assert torch.allclose(sched.sigmas.double(), ours.double(), rtol=1e-5, atol=1e-7)


def test_sigma_to_t_inverts_the_training_sigmas():
    ms = model_sigmas(AC)
    t = sigma_to_t(ms, ms.log())
    assert _max_diff(t, torch.arange(1000.0)) <= 2e-3
    assert torch.equal(sigma_to_t(ms * 1.0001, ms.log(), quantize=True), torch.arange(1000.0))
    assert sigma_to_t(torch.tensor([0.0, 1e3]), ms.log()).tolist() == [0.0, 999.0]


# ---------------------------------------------------------------- the sigma denoiser
@pytest.mark.parametrize("param", ["eps", "v"])
def test_sigma_denoiser_equals_the_timestep_denoiser_at_training_sigmas(param):
    """At σ = σ_t: D(x_σ; σ) = x̂0 of the alpha-space denoiser at (x_σ / √(σ² + 1), t), same ε̂."""
    model = MODELS[param][0]
    t = torch.tensor([37, 873])
    sigma = model_sigmas(AC)[t]
    x = _noise() * 3
    eps_s, x0_s = make_sigma_denoiser(model, COND, None, 1.0, param, AC)(x, sigma)
    eps_t, x0_t = make_denoiser(model, COND, None, 1.0, param, AC)(x / (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1), t)
    assert _max_diff(x0_s, x0_t) <= 1e-4 and _max_diff(eps_s, eps_t) <= 1e-4
    assert _max_diff(x0_s + sigma.view(-1, 1, 1, 1) * eps_s, x) <= 1e-5      # x_σ = x̂0 + σ ε̂


def test_sigma_denoiser_calls_the_model_once_with_float_timesteps_and_guidance():
    seen = []

    def model(x, t, c):
        seen.append((x, t, c))
        return torch.cat([torch.full_like(x[:2], 1.0), torch.full_like(x[:2], 3.0)])
    x, cond, uncond = _noise(), torch.ones(2, 3), torch.zeros(2, 3)
    sigma = 0.5 * (model_sigmas(AC)[400] + model_sigmas(AC)[401])
    eps, x0 = make_sigma_denoiser(model, cond, uncond, 7.5, "eps", AC)(x, sigma)
    (xi, ti, ci), = seen
    assert ti.dtype == torch.float32 and ti.shape == (4,) and 400 < ti[0].item() < 401
    assert _max_diff(xi, torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5) <= 1e-6 and torch.equal(ci, torch.cat([uncond, cond]))
    assert torch.all(eps == 1.0 + 7.5 * 2.0) and _max_diff(x0, x - sigma * eps) == 0


def test_sigma_denoiser_dtype_boundary():
    def model(x, t, c):
        assert x.dtype == torch.bfloat16 and c.dtype == torch.bfloat16 and t.dtype == torch.float32
        return x * 0.5
    eps, x0 = make_sigma_denoiser(model, COND, None, 1.0, "eps", AC, dtype=torch.bfloat16)(_noise(), 2.0)
    assert eps.dtype == x0.dtype == torch.float32


# ---------------------------------------------------------------- closed forms
DETERMINISTIC = [("euler", {}), ("heun", {}), ("dpm2", {}), ("lms", {}), ("dpmpp_2m", {}),
                 ("euler_a", {"eta": 0.0}), ("dpm2_a", {"eta": 0.0}), ("dpmpp_2s_a", {"eta": 0.0}),
                 ("dpmpp_sde", {"eta": 0.0})]


@pytest.mark.parametrize("schedule", ["discrete", "karras", "exponential"])
@pytest.mark.parametrize("name,kw", DETERMINISTIC)
def test_oracle_denoiser_lands_on_x0(name, kw, schedule):
    """D(x; σ) = x0 makes the ODE's solution x0 + σ z exact for every consistent solver: every step stays
    on it and the last lands on x0. Tolerance: float32 rounding of x ≈ σ_max z (|x| < 70): 1e-5."""
    x0 = torch.full(SHAPE, 0.25)
    denoise = lambda x, s: ((x - x0) / s, x0)
    sigmas = get_sigmas(AC, 8, schedule)
    steps = list(REGISTRY[name].fn(denoise, x0 + _noise() * sigmas[0].item(), sigmas, **kw))
    for s in steps[:-1]:
        assert _max_diff(s.x_next, x0 + _noise() * s.sigma_next) <= 1e-5
    assert _max_diff(steps[-1].x_next, x0) <= 1e-5


@pytest.mark.parametrize("schedule", ["discrete", "karras"])
def test_dpmpp_2m_last_step_is_its_x0_exactly(schedule):
    """k-diffusion's DPM++ 2M takes its last step with the first-order formula, whose limit at σ = 0 is
    0 · x + 1 · x̂0: the final latent is the last x̂0 itself, not an Euler step that equals it up to rounding."""
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3

    def denoise(x, sigma):
        x0 = torch.tanh(torch.einsum("ij,bjhw->bihw", mix, x) / (1 + sigma))
        return (x - x0) / sigma, x0

    sigmas = get_sigmas(AC, 6, schedule)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0].item()
    steps = list(dpmpp_2m_steps(denoise, x, sigmas))
    assert torch.equal(steps[-1].x_next, steps[-1].pred_x0)


@pytest.mark.parametrize("fn", [euler_steps, heun_steps, dpm2_steps])
def test_churn_raises_sigma_as_karras_alg2(fn):
    """Alg. 2 lines 4-7: inside [S_tmin, S_tmax] the denoiser sees σ̂ = σ (1 + min(S_churn/N, √2 - 1)) at
    x̂ = x + √(σ̂² - σ²) S_noise z; the oracle's run still lands on x0."""
    x0, seen = torch.full(SHAPE, 0.25), []
    denoise = lambda x, s: seen.append(s) or ((x - x0) / s, x0)
    sigmas = get_sigmas(AC, 8, "karras")
    out = drain(fn(denoise, x0 + _noise() * sigmas[0].item(), sigmas, generator=_gen(1), s_churn=80.0,
                   s_tmin=0.05, s_tmax=10.0), None)
    gamma = min(80.0 / 8, 2 ** 0.5 - 1)
    first_calls = seen[::2] if fn is not euler_steps else seen   # Heun/DPM2: the second call is at σ_next / σ_mid
    expected = [s * (1 + gamma) if 0.05 <= s <= 10.0 else s for s in sigmas[:-1].tolist()]
    assert first_calls[:len(expected)] == pytest.approx(expected, rel=1e-12) and expected[0] == sigmas[0].item()
    assert _max_diff(out, x0) <= 1e-5


# observed convergence when the step count doubles (10 -> 20 karras steps): ideal 2 for first order, 4 for
# second order, 16 for LMS (order 4, which its ramp-up and the final Euler step to σ = 0 hold back)
CONVERGENCE = {"euler": (1.8, 2.2), "heun": (3.5, 8), "dpm2": (3.5, 8), "dpmpp_2m": (3.5, 8), "dpmpp_2s_a": (3.5, 8),
               "dpmpp_sde": (3.5, 8), "lms": (6, 20)}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_gaussian_data_converges_to_the_exact_ode_solution_at_the_solver_order(name):
    """Data ~ N(0, I): D(x; σ) = x / (1 + σ²) exactly, and the probability-flow ODE dx/dσ = σ x / (1 + σ²)
    has x(σ) = x_T √(1 + σ²) / √(1 + σ_max²). The error must shrink with the solver's order."""
    denoise = lambda x, s: (x * s / (1 + s * s), x / (1 + s * s))
    kw = {"eta": 0.0} if REGISTRY[name].takes("eta") else {}
    errors = []
    for n in (10, 20):
        sigmas = get_sigmas(AC, n, "karras")
        x_T = _noise() * sigmas[0].item()
        out = drain(REGISTRY[name].fn(denoise, x_T, sigmas, **kw), x_T)
        errors.append(_max_diff(out, x_T / (1 + sigmas[0].item() ** 2) ** 0.5))
    lo, hi = CONVERGENCE[name]
    assert lo <= errors[0] / errors[1] <= hi, errors


# ---------------------------------------------------------------- noise
def test_per_sample_generators_draw_each_row_alone():
    x = torch.zeros(4, 4, 8, 8)
    batch = noise_like(x, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    for i in range(4):
        alone = noise_like(x[:1], [torch.Generator().manual_seed(10 + i)])
        assert torch.equal(batch[i:i + 1], alone)
        assert torch.equal(alone, noise_like(x[:1], torch.Generator().manual_seed(10 + i)))
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(1)), torch.randn((2, 3), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="one per sample"):
        noise_like(x, [torch.Generator()])


STOCHASTIC = sorted(name for name, spec in REGISTRY.items() if spec.stochastic) + ["ddim"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_batch_invariance_with_per_sample_generators(name, monkeypatch):
    """Seeds s+i for the rows of a batch of 4: every noise draw of row i, and its result, equal those of
    seed s+i run alone."""
    draws: list[torch.Tensor] = []
    real = samplers.noise.randn
    monkeypatch.setattr(samplers.noise, "randn", lambda *a, **k: draws.append(real(*a, **k)) or draws[-1])
    spec = resolve_sampler(name)
    options = {"eta": 1.0} if name == "ddim" else {}

    def run(rows):
        draws.clear()
        denoise = denoiser_for(spec, eps_model, torch.zeros(len(rows), 1), None, 1.0, "eps", AC)
        noise = randn((len(rows), 4, 8, 8), [torch.Generator().manual_seed(100 + i) for i in rows])
        gens = [torch.Generator().manual_seed(200 + i) for i in rows]
        return drain(_run(spec, denoise, noise, 6, generator=gens, **options), None), list(draws)
    batch, batch_draws = run(range(4))
    assert len(batch_draws) > 2
    for i in range(4):
        alone, alone_draws = run([i])
        assert len(alone_draws) == len(batch_draws)
        assert all(torch.equal(b[i:i + 1], a) for b, a in zip(batch_draws, alone_draws))
        assert _max_diff(batch[i:i + 1], alone) <= 1e-5


def test_brownian_noise_increments():
    """DPM++ SDE's queries, (σ, s) then (σ, σ_next) with s between: unit variance each, correlation
    √((σ - s)/(σ - σ_next)) as increments of one Brownian path; independent across steps; reproducible."""
    x = torch.zeros(20000, 8)
    noise = BrownianNoise(x, torch.Generator().manual_seed(0))
    a, b = noise(4.0, 3.0), noise(4.0, 1.0)
    c = noise(1.0, 0.5)
    corr = lambda u, v: ((u * v).mean() / (u.std() * v.std())).item()
    assert abs(a.std().item() - 1) < 0.01 and abs(b.std().item() - 1) < 0.01
    assert abs(corr(a, b) - (1 / 3) ** 0.5) < 0.01 and abs(corr(a, c)) < 0.01 and abs(corr(b, c)) < 0.01
    again = BrownianNoise(x, torch.Generator().manual_seed(0))
    assert torch.equal(again(4.0, 3.0), a) and torch.equal(again(4.0, 1.0), b)


def test_dpmpp_sde_is_seeded_and_stochastic():
    run = lambda seed, **kw: _ours(dpmpp_sde_steps, "eps", "karras", seed=seed, **kw)[0]
    assert torch.equal(run(1), run(1)) and _max_diff(run(1), run(2)) > 1e-2
    assert _max_diff(run(1, eta=0.0), _ours(dpmpp_2s_ancestral_steps, "eps", "karras", eta=0.0)[0]) == 0


# ---------------------------------------------------------------- the Step contract, for every sampler
def _run(spec, denoise, noise, num_steps, *, x0=None, t_start=None, **kw):
    """As the pipeline runs a sampler: its space's start point, then `spec.fn` on the schedule it gets."""
    x, schedule = start_for(spec, noise, AC, num_steps, x0=x0, t_start=t_start)
    return spec.fn(denoise, x, schedule, **kw)


def _run_length(spec, num_steps):
    """Steps of a full run: the original's DDIM spacing may add one (7 gives 8)."""
    return len(ddim_timesteps(num_steps)) if spec.space == "alpha" else num_steps


def _spec_run(name, model=eps_model, num_steps=N, **kw):
    spec = resolve_sampler(name)
    denoise = denoiser_for(spec, model, COND, None, 1.0, "eps", AC)
    return spec, _run(spec, denoise, _noise(), num_steps, generator=_gen(9), **kw)


@pytest.mark.parametrize("name", available())
def test_every_sampler_is_one_generator_function_of_keyword_built_steps(name):
    """One shape: `fn(denoise, x, schedule, *, generator=None, **options)`, a generator function (its loop is
    its own, not a helper's), yielding `Step`s that can only be built by keyword; replacing `x_next` steers it."""
    fn = REGISTRY[name].fn
    assert inspect.isgeneratorfunction(fn)
    params = list(inspect.signature(fn).parameters.values())
    assert [p.kind for p in params[:3]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[3:])
    assert params[3].name == "generator" and params[3].default is None
    with pytest.raises(TypeError):
        Step(0, 1, _noise(), _noise(), _noise(), _noise())
    replaced = _noise(seed=5)
    _, gen = _spec_run(name)
    first = next(gen)
    assert isinstance(first, Step)
    first.x_next = replaced
    assert next(gen).x is replaced
    gen.close()


@pytest.mark.parametrize("name", available())
def test_yields_its_steps_and_fills_its_space(name):
    spec, gen = _spec_run(name, num_steps=7)
    steps = list(gen)
    assert len(steps) == _run_length(spec, 7) and [s.index for s in steps] == list(range(len(steps)))
    assert all(s.total == len(steps) and s.x_next.dtype == torch.float32 for s in steps)
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:]))
    if spec.space == "sigma":
        sigmas = get_sigmas(AC, 7).tolist()
        assert [s.sigma for s in steps] == sigmas[:-1] and [s.sigma_next for s in steps] == sigmas[1:]
        assert all(s.t is None for s in steps)
    else:
        assert all(s.sigma is None and isinstance(s.t, int) for s in steps) and steps[-1].t_next == 0


@pytest.mark.parametrize("name", available())
def test_break_stops_the_model_calls(name):
    model = Counting(eps_model)
    _, gen = _spec_run(name, model)
    for step in gen:
        if step.index == 2:
            calls = model.calls
            break
    gen.close()
    assert model.calls == calls and 3 <= calls <= 6


@pytest.mark.parametrize("name", available())
def test_replacing_x_next_steers_the_run(name):
    replaced = _noise(seed=5)
    _, gen = _spec_run(name)
    for step in gen:
        if step.index == 3:
            step.x_next = replaced
            break
    rest = list(gen)
    assert rest[0].x is replaced and len(rest) == _run_length(REGISTRY[name], N) - 4
    _, full = _spec_run(name)
    assert _max_diff(rest[-1].x_next, drain(full, None)) > 1e-2


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "dpmpp_2s_a"])
def test_one_step_samplers_continue_as_a_fresh_run(name):
    """Samplers with no history are Markov in x: continuing from a replaced x_next equals a fresh run
    from it on the remaining noise levels."""
    fn, denoise = REGISTRY[name].fn, make_sigma_denoiser(eps_model, COND, None, 1.0, "eps", AC)
    sigmas, replaced = get_sigmas(AC, N, "karras"), _noise(seed=5)
    kw = {"eta": 0.0} if REGISTRY[name].takes("eta") else {}
    gen = fn(denoise, _noise() * sigmas[0].item(), sigmas, **kw)
    for step in gen:
        if step.index == 3:
            step.x_next = replaced
            break
    assert torch.equal(drain(gen, None), drain(fn(denoise, replaced, sigmas[4:], **kw), None))


# ---------------------------------------------------------------- the registry
A1111 = {"Euler a": ("euler_a", "discrete"), "Euler": ("euler", "discrete"), "LMS": ("lms", "discrete"),
         "Heun": ("heun", "discrete"), "DPM2": ("dpm2", "discrete"), "DPM2 a": ("dpm2_a", "discrete"),
         "DPM++ 2S a": ("dpmpp_2s_a", "discrete"), "DPM++ 2M": ("dpmpp_2m", "discrete"),
         "DPM++ SDE": ("dpmpp_sde", "discrete"), "LMS Karras": ("lms", "karras"),
         "DPM2 Karras": ("dpm2", "karras"), "DPM2 a Karras": ("dpm2_a", "karras"),
         "DPM++ 2S a Karras": ("dpmpp_2s_a", "karras"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
         "DPM++ SDE Karras": ("dpmpp_sde", "karras"), "euler a exponential": ("euler_a", "exponential"),
         "DDIM": ("ddim", None), "PLMS": ("plms", None), "k_euler_a": ("euler_a", "discrete"),
         "k_dpm_2_a": ("dpm2_a", "discrete"), "dpmpp-2m": ("dpmpp_2m", "discrete")}


@pytest.mark.parametrize("label", list(A1111))
def test_a1111_names_resolve(label):
    spec = resolve_sampler(label)
    assert (spec.name, spec.schedule) == A1111[label]
    assert resolve_sampler(label.upper()) == spec
    assert resolve_sampler(spec.a1111_name) == spec    # the label written into a PNG reads back


def test_resolve_schedules_and_errors():
    assert resolve_sampler("dpmpp_2m", schedule="Karras") == resolve_sampler("DPM++ 2M Karras")
    assert resolve_sampler("ddim", schedule="normal").schedule is None
    for bad, kw in [("euler_x", {}), ("DDIM Karras", {}), ("euler", {"schedule": "cosine"}),
                    ("LMS Karras", {"schedule": "exponential"})]:
        with pytest.raises(ValueError):
            resolve_sampler(bad, **kw)


def test_register_is_one_line(monkeypatch):
    monkeypatch.setattr("samplers.registry.REGISTRY", dict(REGISTRY))
    monkeypatch.setattr("samplers.registry.ALIASES", dict(ALIASES))
    register("my_euler", euler_steps, aliases=("My Euler",))
    spec = resolve_sampler("MY EULER Karras")
    assert spec.fn is euler_steps and spec.space == "sigma" and spec.schedule == "karras"


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_spec_img2img_starts_where_each_space_expects(name):
    """Alpha space: `stochastic_encode` then the last t_start steps, as the pipeline's img2img; sigma space:
    x0 + σ z at the first of the last t_start + 1 levels (A1111's img2img)."""
    spec = resolve_sampler(name)
    x0, noise = torch.full(SHAPE, 0.5), _noise()
    denoise = denoiser_for(spec, eps_model, COND, None, 1.0, "eps", AC)
    steps = list(_run(spec, denoise, noise, N, x0=x0, t_start=4, generator=_gen(1)))
    assert len(steps) == 4
    if spec.space == "alpha":
        z = stochastic_encode(x0, AC, N, 4, noise=noise)
        direct = list(ddim_steps(denoise, z, ddim_schedule(AC, N)[:4], generator=_gen(1)))
        assert torch.equal(steps[-1].x_next, direct[-1].x_next)
    else:
        sigma = get_sigmas(AC, N)[N - 4].item()
        assert steps[0].sigma == sigma and torch.equal(steps[0].x, x0 + noise * sigma)
    assert list(_run(spec, denoise, noise, N, x0=x0, t_start=0)) == []
    with pytest.raises(ValueError, match="t_start"):
        _run(spec, denoise, noise, N, x0=x0, t_start=N + 1)


def test_sigma_img2img_walks_the_last_levels():
    sigmas = get_sigmas(AC, N, "karras")
    x, rest = sigma_start(_noise(), sigmas, torch.ones(SHAPE), t_start=3)
    assert torch.equal(rest, sigmas[-4:]) and torch.equal(x, 1 + _noise() * sigmas[-4].item())
    x, rest = sigma_start(_noise(), sigmas)
    assert torch.equal(rest, sigmas) and torch.equal(x, _noise() * sigmas[0].item())


def test_lms_coefficients_integrate_the_lagrange_basis():
    """The coefficients of order k sum to σ_{i+1} - σ_i and integrate polynomials of degree < k exactly."""
    sig = get_sigmas(AC, 12, "karras").double().tolist()
    for order in (1, 2, 3, 4):
        i = 6
        c = [lms_coefficient(sig, i, j, order) for j in range(order)]
        assert math.isclose(sum(c), sig[i + 1] - sig[i], rel_tol=1e-12)
        f = lambda s: s ** (order - 1) + 3
        exact = (sig[i + 1] ** order - sig[i] ** order) / order + 3 * (sig[i + 1] - sig[i])
        assert math.isclose(sum(cj * f(sig[i - j]) for j, cj in enumerate(c)), exact, rel_tol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", available())
def test_cuda_follows_the_cpu_noise(name):
    """Noise comes from CPU generators (one per sample here), so a seed gives the same latents on the GPU."""
    out = {}
    for device in ("cpu", "cuda"):
        spec = resolve_sampler(name, "karras" if REGISTRY[name].space == "sigma" else None)
        denoise = denoiser_for(spec, eps_model, COND.to(device), None, 1.0, "eps", AC)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out[device] = drain(_run(spec, denoise, _noise().to(device), N, generator=gens), None)
    assert out["cuda"].device.type == "cuda" and _max_diff(out["cuda"].cpu(), out["cpu"]) <= TOL
