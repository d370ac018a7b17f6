"""Train the built-in model from scratch: a latent diffusion model in the official SD 1.x format, at tiny
sizes, on the captioned shape pictures of tools/shapes.py.

    python tools/train_tiny.py --seed 2 --threads 1    # the shipped file: 16-25 minutes on 2 CPU cores
    python tools/train_tiny.py --seed 2 --resume       # go on from the last checkpoint in --workdir

The stages are those of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"):
1. the perceptual compression stage (their sec. 3.1): the KL-regularised autoencoder `AutoencoderKL`
   (models/vae.py), trained on pictures alone with a reconstruction loss (L1 + L2) and a small KL term
   towards N(0, I). Left out: the LPIPS perceptual loss and the patch-GAN discriminator of their
   `LPIPSWithDiscriminator` (flat shapes on flat backgrounds need neither to come back sharp, and both
   need pretrained or extra networks);
2. the latent scale (their appendix G / `scale_by_std`): 1 / std of the frozen encoder's latents, times
   1/3 here (so that the text, not the starting noise, decides where the shape goes: see `encode_pool`);
   stored as `scale_factor` in the YAML;
3. the latent diffusion model (their sec. 3.3, eq. 2 with the cross-attention conditioning of eq. 3):
   `UNetModel` (models/unet.py) predicting the noise eps added to a scaled latent at a uniform t under
   SD's linear beta schedule (0.00085 .. 0.012, 1000 steps), with the text tower `CLIPTextModel`
   (models/clip_text.py, the real CLIP BPE tokenizer) trained alongside as its tau_theta, and 10% of the
   captions dropped to the empty string so that classifier-free guidance (Ho & Salimans 2021) works.
   One departure from the paper's eps prediction: the network predicts v = sqrt(a) eps - sqrt(1 - a) x0
   (Salimans & Ho 2022, as SD 2's 768-v model; `parameterization: "v"` in the YAML), so that at the noisy
   steps where the layout is decided its output is the picture, not a 2% residual on the noise (see
   `train_unet`).
   The shipped UNet and text tower are the exponential moving average of their weights (`use_ema`).

The networks are the very classes ldm samples with, so the keys are the official ones
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) and `ldm.load`
reads the result strictly, as it reads sd-v1-4.ckpt. Everything is deterministic from --seed (data,
initialisation, noise, order; torch's thread count fixed by --threads). Checkpoints in --workdir every
--save-every steps; --resume continues from the last one. At the end: the weights (float16) with the
seed, the command and the timings in the safetensors `__metadata__`, the YAML in the original
v1-inference.yaml schema, the text tower's config.json folder it names, a loss plot, and an evaluation
with tools/shapes.py's pixel rule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from models.config import UNetConfig, VAEConfig  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from models.unet import UNetModel  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402
from shapes import draw_batch, random_scenes  # noqa: E402
from tiny_files import plot_losses, write_model  # noqa: E402

DEFAULT_OUT = ROOT / "weights" / "builtin" / "tiny"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the model, besides the seed."""
    size: int = 32
    vae: VAEConfig = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32)
    # Three levels, 8x8 / 4x4 / 2x2 latent pixels: at the last each pixel is a quadrant of the picture, and
    # the zero padding tells the four apart, which is where "at the top left" is learnt (with two levels,
    # 1200 steps learnt colour and shape but put the shape anywhere).
    unet: UNetConfig = UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1,
                                  attention_resolutions=(1, 2, 4), num_heads=4, context_dim=64)
    text: CLIPTextConfig = CLIPTextConfig(width=64, layers=2, heads=2, intermediate_size=256)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    pool: int = 12000            # pictures encoded once for stage 3
    latent_scale: float = 1 / 3  # scale_factor = latent_scale / std of the latents (the paper: 1 / std); see encode_pool
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1e-3         # 2e-3 with the v target: the loss jumped from 0.08 to 0.43 at step 500 and stayed (a dead network)
    warmup: int = 200
    caption_dropout: float = 0.1
    token_init: float = 0.5      # std of the text tower's token embeddings at the start (CLIP: 0.02); see init_text
    # Fraction of each batch whose t is drawn from the noisier half, [T/2, T), where the picture's layout is decided:
    # measured at step 750 (seed 0), the place right in 62% of the pictures with 0.5, in 25% (chance) with 0.
    high_t: float = 0.5
    prediction: str = "v"        # what the UNet predicts: "v" (Salimans & Ho 2022) or "eps" (SD 1.x's own)
    ema_decay: float = 0.995
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000


# ---------------------------------------------------------------- small helpers
def seeded(seed: int, *parts: int) -> int:
    """A 63-bit seed for one (stage, step): data and noise are a function of where the run is, so a resumed
    run draws exactly what an uninterrupted one would have."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def zero_(module: torch.nn.Module) -> None:
    for p in module.parameters():
        torch.nn.init.zeros_(p)


def init_unet(unet: UNetModel) -> None:
    """As the original: the last convolution of every ResBlock, every transformer's proj_out and the output
    convolution start at zero, so each block starts as the identity."""
    from models.unet import ResBlock, SpatialTransformer

    for m in unet.modules():
        if isinstance(m, ResBlock):
            zero_(m.out_layers[3])
        elif isinstance(m, SpatialTransformer):
            zero_(m.proj_out)
    zero_(unet.out[2])


def init_text(text: CLIPTextModel, token_std: float) -> None:
    """CLIP's initialisation of the embeddings (models/layers.embedding leaves them empty), with larger token
    embeddings. At CLIP's std 0.02 (norm 0.16 at width 64) a word starts as a whisper in the residual stream: the
    colour words, which the UNet can use at once, grew, but the place words stayed indistinguishable (measured:
    "top left" and "bottom right" 0.08 apart at their own positions, outputs of norm 7.8, after 1000 steps; the
    UNet then gets no gradient to read them, and they no gradient to grow)."""
    emb = text.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=token_std)
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)


def schedule_buffers(r: Recipe) -> dict[str, torch.Tensor]:
    """The DDPM buffers LatentDiffusion.register_schedule stores in every official checkpoint (v_posterior 0)."""
    betas = torch.linspace(r.linear_start ** 0.5, r.linear_end ** 0.5, r.timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1 - prev) / (1 - acp)
    out = {"betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": prev,
           "sqrt_alphas_cumprod": acp.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
           "log_one_minus_alphas_cumprod": (1 - acp).log(), "sqrt_recip_alphas_cumprod": (1 / acp).sqrt(),
           "sqrt_recipm1_alphas_cumprod": (1 / acp - 1).sqrt(), "posterior_variance": post_var,
           "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
           "posterior_mean_coef1": betas * prev.sqrt() / (1 - acp),
           "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - acp)}
    return {k: v.float() for k, v in out.items()}


class EMA:
    """Exponential moving average of a module's floating-point tensors (the original's LitEma, with its
    warm-up: decay min(decay, (1 + n) / (10 + n)))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.shadow = state["updates"], state["shadow"]


# ---------------------------------------------------------------- checkpoints
class Checkpoints:
    def __init__(self, workdir: Path):
        self.path = workdir / "last.pt"
        workdir.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict:
        if not self.path.is_file():
            return {}
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        state.setdefault("load", []).append(os.getloadavg()[0])  # who else used the machine meanwhile
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- stage 1: the autoencoder
def train_vae(r: Recipe, seed: int, state: dict, ckpt: Checkpoints, save_every: int) -> AutoencoderKL:
    torch.manual_seed(seeded(seed, 1, 0))
    vae = AutoencoderKL(r.vae)
    opt = torch.optim.Adam(vae.parameters(), lr=r.vae_lr)
    start = 0
    if state.get("vae_step"):
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        start = state["vae_step"]
    losses = state.setdefault("losses", {}).setdefault("vae", [])
    bar = tqdm(range(start, r.vae_steps), desc="stage 1: autoencoder", initial=start, total=r.vae_steps,
               unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r.vae_steps, r.vae_lr, r.warmup)
        rng = np.random.default_rng(seeded(seed, 1, step))
        x = torch.from_numpy(draw_batch(random_scenes(rng, r.vae_batch), r.size))
        g = torch.Generator().manual_seed(seeded(seed, 11, step))
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(g))
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        # KL(q(z|x) || N(0, I)), summed over the latent as in the original, averaged over the batch
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).sum((1, 2, 3)).mean()
        loss = rec + r.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.0f}")
        if (step + 1) % save_every == 0 or step + 1 == r.vae_steps:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step + 1)
            ckpt.save(state)
    bar.close()
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def check_reconstructions(r: Recipe, seed: int, vae: AutoencoderKL, n: int = 300) -> dict:
    """The pixel rule (tools/shapes.py) on the autoencoder's reconstructions of fresh pictures: what the
    diffusion model can at best reach through this decoder."""
    from ldm.images import to_uint8
    from shapes import judge

    scenes = random_scenes(np.random.default_rng(seeded(seed, 4, 0)), n)
    recon = vae.decode(vae.encode(torch.from_numpy(draw_batch(scenes, r.size))).mode())
    verdicts = [judge(image, s.caption) for image, s in zip(to_uint8(recon), scenes)]
    return {k: round(float(np.mean([v[k] for v in verdicts if k in v])), 3)
            for k in ("colour", "shape", "place", "background")}


@torch.no_grad()
def closest_colours(r: Recipe, vae: AutoencoderKL, latent_std: float) -> tuple[float, str]:
    """(distance, "colour-colour"): the two colours whose flat pictures the encoder puts closest, in stds of the
    latents (the mean over the inner latent pixels of the per-pixel distance). Classifier-free guidance pushes a
    picture past its colour along these gaps: seed 0's autoencoder put orange and yellow about 0.2 apart and its
    model drew orange as yellow; seed 2's closest pair is about 0.44 apart and its colours are right in 97%."""
    from itertools import combinations
    from shapes import COLOURS

    flat = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[:, :, None, None] / 127.5 - 1
    z = vae.encode(flat.expand(-1, -1, r.size, r.size).contiguous()).mode()
    side = z.shape[-1]
    inner = z[:, :, side // 4:side - side // 4, side // 4:side - side // 4]  # the middle, away from the padding
    gaps = {f"{a}-{b}": float((inner[i] - inner[j]).norm(dim=0).mean() / latent_std)
            for (i, a), (j, b) in combinations(enumerate(COLOURS), 2)}
    pair = min(gaps, key=gaps.get)
    return round(gaps[pair], 3), pair


# ---------------------------------------------------------------- stage 2: the latents and their scale
@torch.no_grad()
def encode_pool(r: Recipe, seed: int, vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor, list[str], float]:
    """The pool of training pictures for stage 3: posterior means and stds, captions, and the scale factor
    1 / std of the latents (measured on posterior samples, as the original's scale_by_std)."""
    rng = np.random.default_rng(seeded(seed, 2, 0))
    scenes = random_scenes(rng, r.pool)
    means, stds = [], []
    for i in tqdm(range(0, r.pool, 500), desc="stage 2: encoding the pool", unit="batch", dynamic_ncols=True):
        posterior = vae.encode(torch.from_numpy(draw_batch(scenes[i:i + 500], r.size)))
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    g = torch.Generator().manual_seed(seeded(seed, 2, 1))
    z = mean + std * torch.randn(mean.shape, generator=g)
    # The paper scales the latents to unit variance. Here that leaves where the shape is readable from the noisy
    # latent down to t ~ 850 (the latents of two places are ~13 apart: SNR 1 where sqrt(a / (1 - a)) * 13 / 2 = 1),
    # so the model learns to read the place from the noise instead of from "at the top left", and at sampling
    # time puts the shape wherever x_T suggests. A third of that scale (an SNR shift of -9.5 dB, as Chen 2023 /
    # Hoogeboom et al. 2023 shift schedules) leaves the place to the text above t ~ 600 and the colour above
    # t ~ 450, the levels where the picture's layout is decided.
    return mean, std, [s.caption for s in scenes], float(r.latent_scale / z.flatten().std())


# ---------------------------------------------------------------- stage 3: the latent diffusion model
def train_unet(r: Recipe, seed: int, state: dict, ckpt: Checkpoints, save_every: int,
               pool: tuple) -> tuple[UNetModel, CLIPTextModel, float]:
    mean, std, captions, scale = pool
    torch.manual_seed(seeded(seed, 3, 0))
    unet, text = UNetModel(r.unet), CLIPTextModel(r.text)
    init_unet(unet)
    init_text(text, r.token_init)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.0)
    ema_unet, ema_text = EMA(unet, r.ema_decay), EMA(text, r.ema_decay)
    start = 0
    if state.get("unet_step"):
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["unet_opt"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        start = state["unet_step"]
    tokenizer = Tokenizer(r.text.pad_token, r.text.context_length)
    names = sorted(set(captions))
    tokens = tokenizer(names + [""])
    index = {c: i for i, c in enumerate(names)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = len(names)
    acp = schedule_buffers(r)["alphas_cumprod"]
    losses = state.setdefault("losses", {}).setdefault("unet", [])
    bar = tqdm(range(start, r.unet_steps), desc="stage 3: UNet + text tower", initial=start,
               total=r.unet_steps, unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r.unet_steps, r.unet_lr, r.warmup)
        g = torch.Generator().manual_seed(seeded(seed, 3, step))
        pick = torch.randint(len(captions), (r.unet_batch,), generator=g)
        z0 = scale * (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g))
        ids = torch.where(torch.rand(r.unet_batch, generator=g) < r.caption_dropout, empty, caption_ids[pick])
        t = torch.randint(r.timesteps, (r.unet_batch,), generator=g)
        noisy = torch.rand(r.unet_batch, generator=g) < r.high_t  # where the layout is decided: see Recipe.high_t
        t = torch.where(noisy, r.timesteps // 2 + t // 2, t)
        noise = torch.randn(z0.shape, generator=g)
        a = acp[t][:, None, None, None]
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        # At the high noise levels where the layout is decided (t = 999: a = 0.005) the eps target is x_t plus a
        # 2% trace of the picture: an eps network that ignores "at the top left" loses almost nothing there, and
        # (measured: 1500 steps, the place right 20% of the time, chance) puts the shape wherever x_T suggests.
        # The v target sqrt(a) eps - sqrt(1 - a) x0 is there almost all picture (Salimans & Ho 2022, eq. 9 ff.;
        # its MSE is the x0 error weighted SNR + 1).
        target = noise if r.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z0
        loss = (unet(x_t, t, text(tokens[ids])) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == r.unet_steps:
            state.update(unet=unet.state_dict(), text=text.state_dict(), unet_opt=opt.state_dict(),
                         ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(), unet_step=step + 1)
            ckpt.save(state)
    bar.close()
    unet.load_state_dict(ema_unet.shadow)
    text.load_state_dict(ema_text.shadow)
    return unet.eval().requires_grad_(False), text.eval().requires_grad_(False), scale


# ---------------------------------------------------------------- main
STAGE_FIELDS = {"vae": ("size", "vae", "vae_steps", "vae_batch", "vae_lr", "kl_weight", "warmup"),
                "unet": ("pool", "latent_scale", "unet", "text", "unet_steps", "unet_batch", "unet_lr", "warmup", "caption_dropout", "token_init", "high_t",
                         "ema_decay", "prediction", "linear_start", "linear_end", "timesteps")}


def stage_recipe(r: Recipe, stage: str) -> str:
    return json.dumps({k: v for k, v in asdict(r).items() if k in STAGE_FIELDS[stage]}, sort_keys=True)


def resumed(ckpt: Checkpoints, r: Recipe, seed: int) -> dict:
    """The last checkpoint, if it was made with this seed and this recipe. A stage 3 not yet begun may have
    another recipe (then the finished autoencoder is reused); a stage in progress may not."""
    state = ckpt.load()
    if not state:
        print(f"no checkpoint in {ckpt.path.parent}: starting from scratch")
        return {}
    if state.get("seed") != seed or state.get("recipe_vae") != stage_recipe(r, "vae"):
        raise SystemExit(f"{ckpt.path} was made with another seed or autoencoder recipe; drop --resume or pass "
                         "the same flags")
    if state.get("recipe_unet") != stage_recipe(r, "unet"):
        if state.get("unet_step"):
            raise SystemExit(f"{ckpt.path} is in stage 3 with another recipe; drop --resume or pass the same flags")
        state.get("losses", {}).pop("unet", None)
    print(f"resuming from {ckpt.path}: autoencoder step {state.get('vae_step', 0)}, "
          f"UNet step {state.get('unet_step', 0)}")
    return state


def build_parser() -> argparse.ArgumentParser:
    r = Recipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="decides the data, the initialisation and the noise")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the model goes: OUT.safetensors, OUT.yaml and the text tower's folder beside them "
                        f"(default {DEFAULT_OUT.relative_to(ROOT)}, the built-in model)")
    p.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "train_tiny",
                   help="checkpoints and the loss plot")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed: the sums' order depends on it)")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every this many steps")
    p.add_argument("--vae-steps", type=int, default=r.vae_steps)
    p.add_argument("--unet-steps", type=int, default=r.unet_steps)
    p.add_argument("--unet-lr", type=float, default=r.unet_lr)
    p.add_argument("--vae-lr", type=float, default=r.vae_lr)
    p.add_argument("--unet-batch", type=int, default=r.unet_batch)
    p.add_argument("--vae-batch", type=int, default=r.vae_batch)
    p.add_argument("--pool", type=int, default=r.pool)
    p.add_argument("--factor", type=int, choices=(4, 8), default=r.vae.downsampling_factor,
                   help="the autoencoder's downsampling factor (latents of size/factor)")
    p.add_argument("--unet-channels", type=int, default=r.unet.model_channels)
    p.add_argument("--unet-mult", default=",".join(map(str, r.unet.channel_mult)), help="channel_mult, e.g. 1,1,2")
    p.add_argument("--unet-attention", default=",".join(map(str, r.unet.attention_resolutions)),
                   help="attention_resolutions (downsampling factors), e.g. 1,2,4")
    p.add_argument("--prediction", choices=("eps", "v"), default=r.prediction, help="what the UNet predicts")
    p.add_argument("--token-init", type=float, default=r.token_init, help="std of the initial token embeddings")
    p.add_argument("--high-t", type=float, default=r.high_t, help="fraction of t drawn from the noisier half")
    p.add_argument("--eval", type=int, default=60, help="evaluate the result on this many captions (0: skip)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    r = Recipe()
    r = replace(r, vae=replace(r.vae, ch_mult=(1, 2, 2) if args.factor == 4 else (1, 2, 2, 2)),
                unet=replace(r.unet, model_channels=args.unet_channels,
                             channel_mult=tuple(int(x) for x in args.unet_mult.split(",")),
                             attention_resolutions=tuple(int(x) for x in args.unet_attention.split(","))),
                prediction=args.prediction, token_init=args.token_init, high_t=args.high_t)
    r = replace(r, vae_steps=args.vae_steps, unet_steps=args.unet_steps, unet_lr=args.unet_lr,
                vae_lr=args.vae_lr, unet_batch=args.unet_batch, pool=args.pool,
                vae_batch=args.vae_batch)
    ckpt = Checkpoints(args.workdir)
    state = resumed(ckpt, r, args.seed) if args.resume else {}
    state.update(seed=args.seed, **{f"recipe_{stage}": stage_recipe(r, stage) for stage in STAGE_FIELDS})
    timings = state.setdefault("timings", {})
    cpu = state.setdefault("cpu_seconds", {})

    def clock(stage: str, t0: tuple) -> None:
        timings[stage] = timings.get(stage, 0.0) + time.time() - t0[0]
        cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - t0[1]

    t0 = time.time(), time.process_time()
    vae = train_vae(r, args.seed, state, ckpt, args.save_every)
    clock("vae", t0)
    recon = check_reconstructions(r, args.seed, vae)
    print(f"the pixel rule on the autoencoder's reconstructions: {recon}")
    t0 = time.time(), time.process_time()
    pool = encode_pool(r, args.seed, vae)
    timings["latents"], cpu["latents"] = 0.0, 0.0
    clock("latents", t0)
    print(f"scale_factor = {r.latent_scale:.3g} / std of the latents = {pool[3]:.5f}")
    gap = closest_colours(r, vae, r.latent_scale / pool[3])
    print(f"closest colours in the latent space: {gap[1]}, {gap[0]:.2f} latent stds apart (below ~0.3 the guidance "
          "draws one as the other: try another --seed)")
    t0 = time.time(), time.process_time()
    unet, text, scale = train_unet(r, args.seed, state, ckpt, args.save_every, pool)
    clock("unet", t0)
    ckpt.save(state)

    command = "python tools/train_tiny.py " + " ".join(shlex.quote(a) for a in argv)
    metadata = {"ldm_builtin": "trained by tools/train_tiny.py", "seed": str(args.seed), "command": command,
                "recipe": asdict(r), "autoencoder_reconstruction": recon, "closest_colours": gap,
                "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
                "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
                "torch": torch.__version__, "threads": str(args.threads),
                "load_average": round(float(np.mean(state["load"])), 2),  # 1-minute, sampled at each checkpoint
                "cpus": str(os.cpu_count())}
    path = write_model(args.out, r, unet, vae, text, scale, metadata, schedule_buffers(r))
    plot_losses(state["losses"], args.workdir / "loss.png")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), {args.out.with_suffix('.yaml')}, "
          f"{args.workdir / 'loss.png'}")
    print("seconds per stage (wall / CPU): " + ", ".join(f"{k} {v:.0f} / {cpu[k]:.0f}" for k, v in timings.items()))
    if args.eval:
        from shapes import evaluate_file
        report = evaluate_file(path, n_seen=args.eval)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
