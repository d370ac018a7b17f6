"""Speed and memory of ldm against diffusers, on the same random SD weights, in one process.

    .venv/bin/python tools/bench.py --dtypes float32 --json bench.json    # all rows in float32
    .venv/bin/python tools/bench.py --rows unet256 --dtypes float32 --repeats 3
    .venv/bin/python tools/bench.py --rows unet512,txt2img --dtypes float32,bfloat16 --steps 4
    .venv/bin/python tools/bench.py --device cuda --dtypes float32,float16,bfloat16 --steps 20 --json cuda.json
    .venv/bin/python tools/bench.py --rows upscale --dtypes float32 --steps 20 --repeats 1 --warmup 0  # 256 -> 1024
    .venv/bin/python tools/bench.py --tiny --repeats 1 --warmup 0         # tiny configs: a smoke run in seconds
    OMP_NUM_THREADS=2 .venv/bin/python tools/bench.py --rows unet512 --dtypes bfloat16 --compile  # ldm compiled

Needs the reference data (`../shared`, or `LDM_SHARED=...`, or `--shared`) for the official key layouts, plus
diffusers and transformers (the test extras); nothing is downloaded. Full-size models: about 9 GB of RAM
(each library holds its own copy of the weights; the load rows' diffusers process peaks near 9 GB). On a
2-core CPU a float32 run of every row takes over an hour (a 512x512 CFG step is tens of seconds, txt2img
and sd2 are the slow rows) and bfloat16 without native CPU support several times that; on an H200 the
SD 1.x and sd2 rows in float32 and float16 (20-step txt2img) took about a minute, model building included.

How it compares. One random SD 1.x checkpoint in the official layout (`tools/make_checkpoint.py`'s weights,
keys from `shared/reference/layouts/sd1.json`) is built into ldm's networks and, through diffusers' own
original-checkpoint converters (`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`,
`create_vae_diffusers_config_from_ldm`, `convert_ldm_vae_checkpoint`), into diffusers' `UNet2DConditionModel`
and `AutoencoderKL`; the text encoder is transformers' `CLIPTextModel` with the same weights. Each row runs
`--warmup` untimed calls of each library, then `--repeats` rounds that alternate which library goes first,
and reports the medians. On CUDA the device is synchronised before and after every timed call. Both
libraries run under the same global backend flags (ldm's policy, as `ldm.load` sets it: on CUDA in float32,
TF32 off) and both attend through PyTorch's scaled_dot_product_attention.

Rows (`--rows`, comma-separated; default all):
    unet256, unet512  one classifier-free-guidance step: the UNet on a batch of 2 (uncond + cond) at
                      256x256 / 512x512 (latents 32x32 / 64x64), then uncond + 7.5 (cond - uncond)
    vae               VAE decode of one 512x512 image
    text              the text encoder on a batch of 2 token sequences (a prompt and "")
    txt2img           a whole 512x512 txt2img of `--steps` DDIM steps (default 4) at guidance 7.5, from the
                      prompt: `ldm.pipeline.txt2img` on a LatentDiffusion assembled from the networks above, and
                      diffusers' `StableDiffusionPipeline` from its converted components with a DDIMScheduler,
                      no safety checker, and a CLIPTokenizer written from open_clip's BPE (same token ids);
                      both start from the same x_T
    load              file -> the three networks on `--device`, in its default dtype (float32 on a CPU, float16
                      on CUDA) or `--load-dtype`, every weight resident (read once: ldm memory-maps a float32 file and would
                      otherwise read it on first use); from an fp16 and an fp32 .safetensors, each load in a
                      fresh subprocess, with its peak RSS (VmHWM; for ldm it counts the mapped file's pages).
                      ldm: `ldm.load(file, config=original.yaml)`, then `place_now` on the parts it leaves for
                      their first call (the VAE encoder), as diffusers loads them all. diffusers: `from_single_file`
                      cannot build a pipeline offline (it fetches the diffusers configs from the hub), so the stand-in is what
                      it does per component, offline: diffusers' checkpoint reader once, then
                      `UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file` with
                      `original_config=` and `create_diffusers_clip_model_from_ldm` with a local CLIP config.
                      Without `accelerate` installed diffusers initialises random weights before loading, as
                      it would for a user. A last row gives each library's import time in those processes.
    sd2               the SD 2.x 768-v UNet (its official layout and config): one CFG step at `--sd2-size`
                      (default 768; 512 for a quicker run), once per `--dtypes` entry
    upscale           the x4 upscaler (its official layout, all of it, and config): a whole 4x upscale of an
                      `--upscale-size` image (default 256 -> 1024) in `--steps` DDIM steps at the script's
                      guidance 10 and noise level 20: `ldm.pipeline.upscale` against diffusers'
                      `StableDiffusionUpscalePipeline` on the converted networks (UNet with the noise level as
                      class label, f=4 VAE scaled 0.08333, the OpenCLIP tower as transformers' CLIPTextModel one
                      block short of its penultimate layer, a DDIMScheduler for v-prediction and the low-res
                      DDPMScheduler, both "scaled_linear" 1e-4..2e-2, which is the original's "linear"). Both get
                      ldm's start code (numpy) and ldm's unit noise for the low-res image's augmentation (handed
                      to the diffusers scheduler's add_noise), so they compute the same thing; with a step count
                      that does not divide 1000 the original DDIM spacing runs more steps than diffusers', and a
                      note says the outputs differ. Use `--steps 20` for the issue's 20-step figure.
The SD 1.x rows (all but load), sd2 and upscale run once per `--dtypes` entry (default float32,bfloat16;
bfloat16 on a CPU without native support is emulated, and a note says so; `--dtypes float32` skips it).

Output: a table of ldm's and diffusers' medians, ldm/diffusers (below 1: ldm is faster) and the max abs
difference of the two outputs, which shows both ran the same computation (the parity tests are in tests/;
with these random weights the UNet's output is small, about 0.05, so it is a sanity check only); then each
side's achieved TFLOP/s (the row's FLOPs, counted once by torch's FlopCounterMode on diffusers' call, over
the median time) and ldm's as a fraction of this machine's plain matmul rate in the row's dtype, measured at
startup (the best of 2048x2048 matmuls over half a second; printed first), so progress reads the same on any CPU or GPU.
`--json out.json` adds every run's time, the outputs' scale and the machine: CPU model, cores, torch threads,
native bf16, memory, the torch/diffusers/transformers versions, the GPU and TF32 flags on CUDA.
`--tiny` uses the tiny reference configs (`shared/reference/fixtures/sd1_tiny`, `sd2v_tiny`,
`shared/reference/special/x4_upscaler_tiny`) with the image sizes divided by 8, for tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

ROWS = ("unet256", "unet512", "vae", "text", "txt2img", "load", "sd2", "upscale")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"


# ---------------------------------------------------------------- models and configs
@dataclass(frozen=True)
class Spec:
    """One model to benchmark: its ldm config, the original YAML config (as parsed) for diffusers'
    converters, and the official key layout the random weights are drawn for."""
    name: str
    cfg: object  # models.config.ModelConfig
    original: dict
    layout: dict


def shared_dir(arg: Optional[str]) -> Path:
    return Path(arg or os.environ.get("LDM_SHARED") or ROOT.parent / "shared")


def original_config(cfg) -> dict:
    """A ModelConfig as the original YAML config (`v1-inference.yaml`, `v2-inference-v.yaml`, ...), which is
    what diffusers' single-file converters read."""
    from models.config import FAMILIES, CLIPTextConfig
    from models.text_encoders import OFFICIAL_CLIP

    u, v, text = cfg.unet, cfg.vae, cfg.text
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
            "use_linear_in_transformer": u.use_linear_in_transformer, "legacy": u.legacy}
    # SD 1 configs name num_heads only, SD 2 configs num_head_channels only; diffusers reads them that way.
    if u.num_heads != -1:
        unet["num_heads"] = u.num_heads
    if u.num_head_channels != -1:
        unet["num_head_channels"] = u.num_head_channels
    if u.num_classes is not None:
        unet["num_classes"] = u.num_classes
    if u.disable_self_attentions is not None:
        unet["disable_self_attentions"] = list(u.disable_self_attentions)
    ddconfig = {"double_z": v.double_z, "z_channels": v.z_channels, "resolution": v.resolution,
                "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
                "num_res_blocks": v.num_res_blocks, "attn_resolutions": list(v.attn_resolutions), "dropout": 0.0}
    # the official towers' names: diffusers builds the text model from s.cfg.text, not from this name
    if isinstance(text, CLIPTextConfig):
        layer = {"layer": "last"} if text.layer == "last" else {"layer": "hidden", "layer_idx": -2}
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": OFFICIAL_CLIP, **layer}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": "ViT-H-14", "layer": text.layer, "freeze": True}}
    params = {"linear_start": cfg.linear_start, "linear_end": cfg.linear_end, "timesteps": cfg.timesteps,
              "scale_factor": cfg.scale_factor, "conditioning_key": cfg.conditioning_key,
              "parameterization": cfg.parameterization or "eps",
              "unet_config": {"target": UNET_TARGET, "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
              "cond_stage_config": cond}
    if "low_scale" in cfg.extra:  # the x4 upscaler's noise augmentation of the low-res image
        params["low_scale_config"] = {"target": "ldm.modules.diffusionmodules.upscaling."
                                                "ImageConcatWithNoiseAugmentation", "params": cfg.extra["low_scale"]}
    target = next(f.target for f in FAMILIES if f.name == cfg.family)  # LatentUpscaleDiffusion, ...
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{target}", "params": params}}


def spec(family: str, tiny: bool, shared: Path) -> Spec:
    """family: "sd1", "sd2v" (SD 2.x 768-v) or "x4_upscaler"."""
    import yaml

    from models.config import PRESETS, from_yaml_dict

    if tiny:
        name = {"sd1": "sd1_tiny", "sd2v": "sd2v_tiny", "x4_upscaler": "x4_upscaler_tiny"}[family]
        folder = shared / "reference" / ("special" if family == "x4_upscaler" else "fixtures") / name
        original = yaml.safe_load((folder / f"{name}.yaml").read_text())
        return Spec(name, from_yaml_dict(original, folder), original,
                    json.loads((folder / f"{name}.layout.json").read_text()))
    cfg = {"sd1": PRESETS["sd1"], "sd2v": replace(PRESETS["sd2"], parameterization="v"),
           "x4_upscaler": PRESETS["x4_upscaler"]}[family]
    layout = {"sd1": "sd1.json", "sd2v": "sd2_768_v.json", "x4_upscaler": "x4_upscaler.json"}[family]
    return Spec(family, cfg, original_config(cfg), json.loads((shared / "reference" / "layouts" / layout).read_text()))


def random_checkpoint(s: Spec, prefix=(), dtype=torch.float32, seed: int = 0) -> dict:
    """Random weights in the official layout, as make_checkpoint writes them; only the keys starting with
    `prefix` (a string or a tuple of them) when one is given."""
    from make_checkpoint import random_state

    keys = {k: v for k, v in s.layout["keys"].items() if not prefix or k.startswith(prefix)}
    return random_state({"keys": keys}, dtype, seed)


def ldm_networks(s: Spec, state: dict) -> dict:
    """ldm's networks on the checkpoint's own tensors (no copy), as ldm.load builds them (the text tower
    from its record: CLIP for SD 1.x, OpenCLIP for the x4 upscaler)."""
    from models.text_encoders import text_encoder
    from models.unet import UNetModel
    from models.vae import AutoencoderKL
    from weights import split_components

    parts = split_components(state).parts
    encoder = text_encoder(s.cfg.text)
    out = {}
    with torch.device("meta"):
        if "unet" in parts:
            out["unet"] = UNetModel(s.cfg.unet)
        if "vae" in parts:
            out["vae"] = AutoencoderKL(s.cfg.vae)
        if encoder.component in parts:
            out["text"] = encoder.module(s.cfg.text)
    states = {"unet": parts.get("unet"), "vae": parts.get("vae"),
              "text": encoder.normalize(parts[encoder.component]) if encoder.component in parts else None}
    for name, module in out.items():
        module.load_state_dict(states[name], strict=True, assign=True)
        module.eval().requires_grad_(False)
    return out


def place_ldm(module, device: torch.device, dtype: torch.dtype, args) -> None:
    """Move an ldm network as ldm.load leaves it: on a CPU, convolutions reorder their weights once per
    input shape and float32 linear layers run on oneDNN (models/prepack.py), unless --no-prepack. The
    switched layers keep plain weights, so .to() needs nothing undone."""
    from models.prepack import can_prepack, onednn_linears, prepack_convolutions

    module.to(device, dtype)
    if device.type == "cpu" and can_prepack(dtype) and not args.no_prepack:
        prepack_convolutions(module), onednn_linears(module)


def hf_clip_config(text_cfg):
    """transformers' CLIPTextConfig of a CLIP tower (SD 1.x) or of an OpenCLIP one (SD 2.x), as diffusers'
    SD 2 pipelines hold it: a CLIPTextModel whose last_hidden_state is the original's output, so a tower
    read at its penultimate layer is built one block short (the final LayerNorm still applies)."""
    import transformers

    from models.openclip_text import OpenCLIPTextConfig
    from models.tokenizer import END, START

    if isinstance(text_cfg, OpenCLIPTextConfig):
        return transformers.CLIPTextConfig(
            vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width,
            num_hidden_layers=text_cfg.layers - (text_cfg.layer == "penultimate"),
            num_attention_heads=text_cfg.heads, intermediate_size=int(text_cfg.width * text_cfg.mlp_ratio),
            max_position_embeddings=text_cfg.context_length, hidden_act=text_cfg.act, layer_norm_eps=1e-5,
            bos_token_id=START, eos_token_id=END, pad_token_id=text_cfg.pad_token, projection_dim=text_cfg.embed_dim)
    return transformers.CLIPTextConfig(
        vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width, num_hidden_layers=text_cfg.layers,
        num_attention_heads=text_cfg.heads, intermediate_size=text_cfg.intermediate_size,
        max_position_embeddings=text_cfg.max_positions, hidden_act=text_cfg.act, layer_norm_eps=1e-5,
        bos_token_id=START, eos_token_id=END, pad_token_id=text_cfg.pad_token, projection_dim=text_cfg.width)


def diffusers_networks(s: Spec, state: dict) -> dict:
    """diffusers' networks (and transformers' CLIP) holding copies of the same weights, converted by
    diffusers' own single-file code."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    out = {}
    if any(k.startswith("model.diffusion_model.") for k in state):
        config = create_unet_diffusers_config_from_ldm(s.original, state)
        out["unet"] = UNet2DConditionModel(**config)
        out["unet"].load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    if any(k.startswith("first_stage_model.") for k in state):
        config = create_vae_diffusers_config_from_ldm(s.original, state)
        out["vae"] = AutoencoderKL(**config)
        out["vae"].load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    openclip = any(k.startswith("cond_stage_model.model.") for k in state)
    if openclip or any(k.startswith("cond_stage_model.transformer.") for k in state):
        text = transformers.CLIPTextModel(hf_clip_config(s.cfg.text))
        expected = text.state_dict()
        # OpenCLIP: diffusers' converter splits the fused q/k/v and renames; the unused last block and the
        # text projection are left out (the model above has no place for them)
        converted = convert_open_clip_checkpoint(text, state) if openclip else convert_ldm_clip_checkpoint(state)
        if not hasattr(text, "text_model"):  # transformers >= 5 dropped the level
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        text.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=True)
        out["text"] = text
    for module in out.values():
        module.eval().requires_grad_(False)
    return out


def write_clip_tokenizer(folder: Path, pad_token_id: Optional[int] = None):
    """An HF CLIPTokenizer from the BPE that open_clip ships (the vocabulary both SD families use), so
    diffusers tokenizes the prompt itself without a download. pad_token_id: the tower's pad token (SD 2's
    OpenCLIP pads with 0, "!", as the hub's SD 2 tokenizers say); None: CLIP's end token, as SD 1's."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): i for k, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    pad = {} if pad_token_id is None else {"pad_token": next(k for k, i in vocab.items() if i == pad_token_id)}
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **pad)


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_abs_diff(a, b) -> Optional[float]:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    return (a.float() - b.float()).abs().max().item()


def count_flops(fn: Callable) -> tuple:
    """(fn(), the floating-point operations it made), by torch's FlopCounterMode (matmuls, convolutions,
    attention; elementwise ops count zero, as usual). The CPU's flash-attention op is counted as the
    other fused attention ops are."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_flash: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop(q, k, v)} if cpu_flash else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = fn()
    return out, counter.get_total_flops() or None


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """The best of n x n @ n x n matmuls in `dtype` on `device` (at least 3, for at least half a second: on a
    shared machine the best one is the machine's, the others its neighbours'), in TFLOP/s: the matrix rate
    the rows' achieved rates are a fraction of."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    torch.mm(a, b)  # sets up the kernel
    best, runs, spent = float("inf"), 0, 0.0
    while runs < 3 or (spent < 0.5 and runs < 50):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        took = time.perf_counter() - start
        best, runs, spent = min(best, took), runs + 1, spent + took
    return 2 * n ** 3 / best / 1e12


class Bench:
    def __init__(self, args, device: torch.device, matmul_rates: Optional[dict] = None):
        self.args, self.device = args, device
        self.matmul_tflops: dict = matmul_rates or {}  # dtype name -> TFLOP/s of a plain matmul here
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self._printed_header = False

    def compare(self, row: str, label: str, ldm_fn: Callable, diffusers_fn: Callable, **extra) -> dict:
        """Warm-up runs of each, then `repeats` rounds alternating which goes first; medians in seconds.
        The row's FLOPs are counted on diffusers' first call (plain PyTorch ops the counter knows; ldm's
        oneDNN ops it does not), made in the warm-up, or after the timing without one."""
        fns = {"ldm": ldm_fn, "diffusers": diffusers_fn}
        outputs, flops = {}, None
        with torch.no_grad():
            for i in range(self.args.warmup):
                for side, fn in fns.items():
                    if i == 0 and side == "diffusers":
                        outputs[side], flops = count_flops(fn)
                    else:
                        outputs[side] = fn()
            times = {"ldm": [], "diffusers": []}
            for i in range(self.args.repeats):
                for side in (("ldm", "diffusers") if i % 2 == 0 else ("diffusers", "ldm")):
                    sync(self.device)
                    start = time.perf_counter()
                    outputs[side] = fns[side]()
                    sync(self.device)
                    times[side].append(time.perf_counter() - start)
            if flops is None:
                flops = count_flops(diffusers_fn)[1]
        out = outputs["ldm"]
        scale = out.float().abs().max().item() if isinstance(out, torch.Tensor) else None
        return self.add(row, label, "s", times, max_abs_diff(out, outputs["diffusers"]), output_max_abs=scale,
                        flops=flops, **extra)

    def add(self, row: str, label: str, unit: str, runs: dict, diff: Optional[float] = None,
            flops: Optional[float] = None, **extra) -> dict:
        medians = {side: statistics.median(v) for side, v in runs.items()}
        result = {"row": row, "label": label, "unit": unit, "ldm": medians["ldm"], "diffusers": medians["diffusers"],
                  "ratio": medians["ldm"] / medians["diffusers"] if medians["diffusers"] else None,
                  "max_abs_diff": diff, "runs": runs, "flops": flops, **extra}
        if flops:
            rate = self.matmul_tflops.get(extra.get("dtype"))
            result["tflops"] = {side: flops / t / 1e12 for side, t in medians.items() if t}
            result["fraction_of_matmul"] = result["tflops"]["ldm"] / rate if rate and "ldm" in result["tflops"] else None
        self.rows.append(result)
        self.print_row(result)
        return result

    def print_row(self, r: dict) -> None:
        if not self._printed_header:
            print(f"{'row':<44} {'ldm':>10} {'diffusers':>10} {'ldm/diff':>9} {'max|diff|':>10} "
                  f"{'TFLOP/s ldm':>11} {'diffusers':>9} {'ldm/mm':>6}")
            print("-" * 117)
            self._printed_header = True
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        tf = r.get("tflops") or {}
        rates = "".join(f" {tf[side]:>{w}.3f}" if side in tf else " " * (w + 1) for side, w in (("ldm", 11), ("diffusers", 9)))
        frac = "" if r.get("fraction_of_matmul") is None else f"{r['fraction_of_matmul']:.0%}"
        print(f"{r['label']:<44} {r['ldm']:>9.3f}{r['unit']:<1} {r['diffusers']:>9.3f}{r['unit']:<1} "
              f"{ratio:>9} {diff:>10}{rates} {frac:>6}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)


def size(args, nominal: int) -> int:
    return nominal // 8 if args.tiny else nominal


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- rows
def unet_row(bench: Bench, row: str, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype) -> None:
    cfg, device = s.cfg, bench.device
    f = cfg.vae.downsampling_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.unet.in_channels, image // f, image // f, generator=g).to(device, dtype)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)

    def guide(out):
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    unet, ref, compiled = nets["unet"], refs["unet"], ""
    if bench.args.compile:  # ldm's unet as `--compile` runs it; compiled in the warm-up; diffusers stays eager
        from ldm.generate import compile_unet

        unet, compiled = compile_unet(unet, device), " (ldm compiled)"
    bench.compare(row, f"{s.name} unet cfg step {image}x{image} {dtype_name(dtype)}{compiled}",
                  lambda: guide(unet(torch.cat([x, x]), t, context)),
                  lambda: guide(ref(torch.cat([x, x]), t, encoder_hidden_states=context).sample),
                  dtype=dtype_name(dtype), size=image, batch=2)


def vae_row(bench: Bench, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype) -> None:
    f = s.cfg.vae.downsampling_factor
    z = torch.randn(1, s.cfg.vae.embed_dim, image // f, image // f,
                    generator=torch.Generator().manual_seed(1)).to(bench.device, dtype)
    vae, ref = nets["vae"], refs["vae"]
    bench.compare("vae", f"{s.name} vae decode {image}x{image} {dtype_name(dtype)}",
                  lambda: vae.decode(z), lambda: ref.decode(z).sample, dtype=dtype_name(dtype), size=image, batch=1)


def text_row(bench: Bench, s: Spec, nets: dict, refs: dict, dtype: torch.dtype) -> None:
    from models.tokenizer import tokenizer_for

    tokens = tokenizer_for(s.cfg.text)([PROMPT, ""]).to(bench.device)
    text, ref = nets["text"], refs["text"]
    bench.compare("text", f"{s.name} text encode batch 2 {dtype_name(dtype)}",
                  lambda: text(tokens), lambda: ref(input_ids=tokens).last_hidden_state,
                  dtype=dtype_name(dtype), batch=2)


def txt2img_row(bench: Bench, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype,
                tokenizer_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm import LatentDiffusion
    from ldm.device import Placement
    from ldm.pipeline import latent_shape, txt2img
    from models.tokenizer import tokenizer_for
    from samplers.schedule import linear_alphas_cumprod

    cfg, steps, seed = s.cfg, bench.args.steps, 42
    model = LatentDiffusion(
        family="sd1", config=cfg, unet=nets["unet"], vae=nets["vae"], text_encoder=nets["text"],
        tokenizer=tokenizer_for(cfg.text), placement=Placement(bench.device, dtype),
        alphas_cumprod=linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps))
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=refs["text"], unet=refs["unet"], scheduler=scheduler,
                                   tokenizer=write_clip_tokenizer(tokenizer_dir), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # ldm's txt2img draws x_T first from a CPU generator seeded with `seed`; diffusers gets the same x_T.
    x_T = torch.randn(latent_shape(model, 1, image, image), generator=torch.Generator().manual_seed(seed))

    def ours():
        return ((txt2img(model, PROMPT, seed=seed, height=image, width=image, steps=steps, sampler="ddim",
                         scale=GUIDANCE, eta=0.0)[0] + 1) / 2).clamp(0, 1)

    def theirs():
        return pipe(PROMPT, height=image, width=image, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    latents=x_T.to(bench.device, dtype), output_type="pt").images

    bench.compare("txt2img", f"{s.name} txt2img {image}x{image} {steps} ddim steps {dtype_name(dtype)}",
                  ours, theirs, dtype=dtype_name(dtype), size=image, steps=steps)


def sd1_rows(bench: Bench, args, shared: Path, dtypes: list, tmp: Path) -> None:
    s = spec("sd1", args.tiny, shared)
    needs = {"unet256": ["unet"], "unet512": ["unet"], "vae": ["vae"], "text": ["text"],
             "txt2img": ["unet", "vae", "text"]}
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model."}
    state = random_checkpoint(s, prefix=tuple({prefixes[n] for r in args.rows for n in needs.get(r, [])}))
    nets = ldm_networks(s, state)
    refs = diffusers_networks(s, state)
    del state
    gc.collect()
    for dtype in dtypes:
        for m in refs.values():
            m.to(bench.device, dtype)
        for m in nets.values():
            place_ldm(m, bench.device, dtype, args)
        gc.collect()
        if "unet256" in args.rows:
            unet_row(bench, "unet256", s, nets, refs, size(args, 256), dtype)
        if "unet512" in args.rows:
            unet_row(bench, "unet512", s, nets, refs, size(args, 512), dtype)
        if "vae" in args.rows:
            vae_row(bench, s, nets, refs, size(args, 512), dtype)
        if "text" in args.rows:
            text_row(bench, s, nets, refs, dtype)
        if "txt2img" in args.rows:
            txt2img_row(bench, s, nets, refs, size(args, 512), dtype, tmp)
    del nets, refs
    gc.collect()


def sd2_rows(bench: Bench, args, shared: Path, dtypes: list) -> None:
    s = spec("sd2v", args.tiny, shared)
    state = random_checkpoint(s, prefix="model.diffusion_model.")
    nets, refs = ldm_networks(s, state), diffusers_networks(s, state)
    del state
    for dtype in dtypes:
        refs["unet"].to(bench.device, dtype)
        place_ldm(nets["unet"], bench.device, dtype, args)
        gc.collect()
        unet_row(bench, "sd2", s, nets, refs, size(args, args.sd2_size), dtype)
    del nets, refs
    gc.collect()


def low_scale_model(s: Spec, state: dict):
    """ldm's noise augmentation of the x4 upscaler, as ldm.load builds it: the config's module with the
    file's `low_scale_model.*` schedule buffers."""
    from models.upscaling import ImageConcatWithNoiseAugmentation
    from weights import sub_state

    module = ImageConcatWithNoiseAugmentation.from_config(s.cfg.extra["low_scale"])
    module.load_state_dict({k: v.float() for k, v in sub_state(state, "low_scale_model.").items()}, strict=True)
    return module


def upscale_row(bench: Bench, s: Spec, nets: dict, refs: dict, low_scale, image: int, dtype: torch.dtype,
                tokenizer_dir: Path) -> None:
    """`ldm.pipeline.upscale` against diffusers' StableDiffusionUpscalePipeline: the low-res image (image x
    image) noise-augmented to the default level on the upscaler's own schedule, then `--steps` DDIM steps of
    the v-prediction UNet with guidance (the script's scale, 10), then the f=4 decode to 4*image. ldm draws
    its start code from numpy (RandomState(seed)) and the augmentation noise from a torch generator seeded
    `seed` (channels-last, as the script's randn_like); diffusers is handed both, its `latents` and, through
    its low-res scheduler's add_noise, the unit noise, so it computes the augmentation itself from the same
    draw. Its schedulers are the upscaler's published ones: the original's "linear" schedules (linspace of
    the square roots, squared) are diffusers' "scaled_linear"."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from ldm import LatentDiffusion
    from ldm.device import Placement
    from ldm.pipeline import NumpyStartCodes, upscale
    from ldm.upscaling import NOISE_LEVEL, SCALE, channels_last_noise
    from models.tokenizer import tokenizer_for
    from samplers.schedule import ddim_timesteps, linear_alphas_cumprod

    cfg, steps, seed, device = s.cfg, bench.args.steps, 42, bench.device
    low = cfg.extra["low_scale"]
    model = LatentDiffusion(
        family="x4_upscaler", config=cfg, unet=nets["unet"], vae=nets["vae"], text_encoder=nets["text"],
        tokenizer=tokenizer_for(cfg.text), placement=Placement(device, dtype), low_scale_model=low_scale,
        alphas_cumprod=linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps))
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="v_prediction")
    schedule = low.get("noise_schedule_config") or {}
    low_res = DDPMScheduler(beta_start=schedule.get("linear_start", 1e-4), beta_end=schedule.get("linear_end", 2e-2),
                            beta_schedule="scaled_linear", num_train_timesteps=schedule.get("timesteps", 1000))
    pipe = StableDiffusionUpscalePipeline(
        vae=refs["vae"], text_encoder=refs["text"], unet=refs["unet"], low_res_scheduler=low_res, scheduler=scheduler,
        tokenizer=write_clip_tokenizer(tokenizer_dir, cfg.text.pad_token), safety_checker=None,
        feature_extractor=None, watermarker=None, max_noise_level=low.get("max_noise_level", 350))
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(7)
    image01 = torch.rand(1, 3, image, image, generator=g)  # the low-res image in [0, 1], as diffusers takes it
    lowres = 2.0 * image01 - 1.0  # what diffusers' preprocessing makes of it, and what ldm takes
    x_T = NumpyStartCodes(seed, 1).draw((1, cfg.vae.embed_dim, image, image))
    noise = channels_last_noise(tuple(lowres.shape), torch.Generator().manual_seed(seed))
    # the schedules the two libraries noise the low-res image with (a mismatch shows here, not as a vague diff)
    levels = {"ldm": low_scale.sqrt_alphas_cumprod.float(), "diffusers": low_res.alphas_cumprod.float().sqrt()}

    def add_noise(original, _noise, timesteps):  # diffusers' own add_noise, on the draw ldm makes
        return DDPMScheduler.add_noise(low_res, original, noise.to(original.device, original.dtype), timesteps)

    low_res.add_noise = add_noise
    ran = len(ddim_timesteps(steps, cfg.timesteps))
    if ran != steps:
        bench.note(f"upscale: the original DDIM spacing runs {ran} steps for --steps {steps}, diffusers' {steps}: "
                   "the two outputs differ (choose a divisor of 1000 to compare them)")

    def ours():
        return ((upscale(model, lowres, PROMPT, seed=seed, steps=steps, sampler="ddim", scale=SCALE, eta=0.0,
                         noise_level=NOISE_LEVEL)[0] + 1) / 2).clamp(0, 1)

    def theirs():
        return pipe(PROMPT, image=image01.to(device), num_inference_steps=steps, guidance_scale=SCALE,
                    noise_level=NOISE_LEVEL, eta=0.0, latents=x_T.to(device, dtype), output_type="pt").images

    f = cfg.vae.downsampling_factor
    bench.compare("upscale", f"{s.name} upscale {image}->{image * f} {steps} ddim {dtype_name(dtype)}", ours, theirs,
                  dtype=dtype_name(dtype), size=image, out_size=image * f, steps=steps, noise_level=NOISE_LEVEL,
                  low_res_schedule_max_abs_diff=max_abs_diff(levels["ldm"], levels["diffusers"]))


def upscale_rows(bench: Bench, args, shared: Path, dtypes: list, tmp: Path) -> None:
    s = spec("x4_upscaler", args.tiny, shared)
    state = random_checkpoint(s)  # all of it: the three networks and the low-res noise schedule
    nets, refs, low_scale = ldm_networks(s, state), diffusers_networks(s, state), low_scale_model(s, state)
    del state
    gc.collect()
    for dtype in dtypes:
        for m in refs.values():
            m.to(bench.device, dtype)
        for m in nets.values():
            place_ldm(m, bench.device, dtype, args)
        gc.collect()
        upscale_row(bench, s, nets, refs, low_scale, size(args, args.upscale_size), dtype, tmp)
    del nets, refs
    gc.collect()


# ---------------------------------------------------------------- load rows: one fresh process per load
def _rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def load_child(args) -> int:
    """Runs in a fresh process: load one checkpoint with one library and print a JSON line."""
    folder = Path(args.load_child_dir)
    device = torch.device(args.device)
    dtype = ready_dtype(args, device)
    start = time.perf_counter()
    if args.load_child == "ldm":
        import ldm
        from ldm.placing import place_now

        def load():
            model = ldm.load(args.ckpt, config=folder / "original.yaml", device=args.device, dtype=dtype_name(dtype))
            nets = [model.unet, model.vae, model.text_encoder]
            for net in nets:  # like for like: diffusers loads every part, ldm leaves unused ones for their first call
                place_now(net)
            return nets
    else:
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (create_diffusers_clip_model_from_ldm,
                                                         load_single_file_checkpoint)
        from diffusers.utils import logging as diffusers_logging

        original = str(folder / "original.yaml")

        def load():
            checkpoint = load_single_file_checkpoint(args.ckpt)
            unet = UNet2DConditionModel.from_single_file(checkpoint, original_config=original, torch_dtype=dtype)
            vae = AutoencoderKL.from_single_file(checkpoint, original_config=original, torch_dtype=dtype)
            text = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint,
                                                        config=str(folder / "clip"), torch_dtype=dtype,
                                                        local_files_only=True)
            return [m.to(device) for m in (unet, vae, text)]
        diffusers_logging.set_verbosity_error()
    import_seconds = time.perf_counter() - start
    gc.collect()
    before = _rss_gb("VmRSS")
    sync(device)
    start = time.perf_counter()
    modules = load()
    sync(device)
    load_seconds = time.perf_counter() - start
    rss_loaded = _rss_gb("VmHWM")
    # ldm leaves a float32 file used in float32 on the CPU memory-mapped: its pages are read on first use.
    # Reading every weight once makes "ready" mean the same for both: all weights in memory.
    with torch.no_grad():
        for m in modules:
            for t in (*m.parameters(), *m.buffers()):
                t.sum()
    sync(device)
    seconds = time.perf_counter() - start
    dtypes = sorted({dtype_name(p.dtype) for m in modules for p in m.parameters()})
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the parent's memory from before exec.
    out = {"seconds": seconds, "load_seconds": load_seconds, "touch_seconds": seconds - load_seconds,
           "import_seconds": import_seconds, "peak_rss_gb": _rss_gb("VmHWM"), "peak_rss_at_return_gb": rss_loaded,
           "rss_before_gb": before, "dtypes": dtypes}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print("LOAD_RESULT " + json.dumps(out))
    return 0


def ready_dtype(args, device: torch.device) -> torch.dtype:
    """The load rows' compute dtype: --load-dtype, else ldm's default for the device."""
    if args.load_dtype:
        return DTYPES[args.load_dtype]
    return torch.float32 if device.type == "cpu" else torch.float16


def run_child(side: str, ckpt: Path, folder: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load-child", side, "--ckpt", str(ckpt),
           "--load-child-dir", str(folder), "--device", args.device] + (["--load-dtype", args.load_dtype]
                                                                       if args.load_dtype else [])
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("LOAD_RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{side} load of {ckpt.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("LOAD_RESULT "):])


def prepare_load_dir(s: Spec, folder: Path) -> None:
    """What both load children read besides the checkpoint: the original YAML config (ldm's `config=`,
    diffusers' `original_config=`) and transformers' CLIP config (a local stand-in for the hub's)."""
    import yaml

    (folder / "original.yaml").write_text(yaml.safe_dump(s.original))
    hf_clip_config(s.cfg.text).save_pretrained(folder / "clip")
    # ldm finds the tower the YAML names (`version:`) from its config.json beside the YAML
    version = s.original["model"]["params"]["cond_stage_config"]["params"]["version"]
    hf_clip_config(s.cfg.text).save_pretrained(folder / version)


def load_rows(bench: Bench, args, shared: Path, tmp: Path) -> None:
    from make_checkpoint import save

    s = spec("sd1", args.tiny, shared)
    prepare_load_dir(s, tmp)
    ready = dtype_name(ready_dtype(args, bench.device))
    for file_dtype in (torch.float16, torch.float32):
        ckpt = tmp / f"{s.name}-{dtype_name(file_dtype)}.safetensors"
        save(random_checkpoint(s, dtype=file_dtype), ckpt)
        gc.collect()
        file_gb = ckpt.stat().st_size / 1e9
        for _ in range(args.warmup):  # the first read of a new file comes from the disk, not the page cache
            for side in ("ldm", "diffusers"):
                run_child(side, ckpt, tmp, args)
        results = {"ldm": [], "diffusers": []}
        for i in range(args.repeats):
            for side in (("ldm", "diffusers") if i % 2 == 0 else ("diffusers", "ldm")):
                results[side].append(run_child(side, ckpt, tmp, args))
        ckpt.unlink()
        common = {"file_dtype": dtype_name(file_dtype), "ready_dtype": ready, "file_gb": file_gb}
        pick = lambda field: {side: [r[field] for r in rs] for side, rs in results.items()}  # noqa: E731
        bench.add("load", f"{s.name} load {dtype_name(file_dtype)} file -> {ready} resident", "s", pick("seconds"),
                  load_seconds=pick("load_seconds"), children=results, **common)
        bench.add("load", f"{s.name} load {dtype_name(file_dtype)} peak RSS (GB)", "G", pick("peak_rss_gb"),
                  rss_before_gb=pick("rss_before_gb"), **common)
        got = {side: sorted({d for r in rs for d in r["dtypes"]}) for side, rs in results.items()}
        if got["ldm"] != got["diffusers"]:
            bench.note(f"load {dtype_name(file_dtype)}: the networks came out as {got} (ldm vs diffusers)")
    bench.add("load", "import the library (load children)", "s", pick("import_seconds"))


# ---------------------------------------------------------------- machine and main
def machine(device: torch.device) -> dict:
    import diffusers
    import transformers

    from ldm.device import cpu_has_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_has_bf16": cpu_has_bf16(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(), "device": str(device)}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the SD 1.x rows (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library and row (the median is shown)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per library before timing")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the txt2img and upscale rows")
    p.add_argument("--sd2-size", type=int, default=768, choices=(512, 768), help="image size of the sd2 row")
    p.add_argument("--upscale-size", type=int, default=256, help="the upscale row's low-res image size (default "
                   "256: 256x256 -> 1024x1024; a multiple of 8)")
    p.add_argument("--load-dtype", choices=("float32", "float16", "bfloat16"),
                   help="the dtype the load rows make ready (default: float32 on a CPU, float16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="time ldm's UNet rows compiled as `--compile` does "
                   "(freezing on a CPU) against diffusers in eager mode; compiling happens in the warm-up")
    p.add_argument("--no-prepack", action="store_true", help="ldm's CPU layers as plain PyTorch runs them: no "
                   "prepacked convolutions, no oneDNN linears (to measure what those gain)")
    p.add_argument("--tiny", action="store_true", help="tiny reference configs and image sizes / 8 (smoke test)")
    p.add_argument("--shared", help="the shared/ folder with reference/ (default $LDM_SHARED or ../shared)")
    p.add_argument("--json", type=Path, help="write the results and the machine description here")
    p.add_argument("--load-child", choices=("ldm", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--load-child-dir", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if sorted(set(args.dtypes) - set(DTYPES)):
        p.error(f"unknown dtypes {args.dtypes}; choose from {','.join(DTYPES)}")
    if args.upscale_size < 8 or args.upscale_size % 8:
        p.error("--upscale-size must be a multiple of 8")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1: the first call compiles")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.load_child:
        return load_child(args)
    from diffusers.utils import logging as diffusers_logging

    from ldm.device import Placement, configure_backends, cpu_has_bf16, resolve_device

    diffusers_logging.set_verbosity_error()
    device = resolve_device(args.device)
    dtypes = [DTYPES[d] for d in args.dtypes]
    shared = shared_dir(args.shared)
    info = machine(device)
    print(f"{info['cpu']}, {info['cpus_usable']} cpus, torch {info['torch']} ({info['torch_threads']} threads), "
          f"diffusers {info['diffusers']}, transformers {info['transformers']}, device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else ""), flush=True)
    # The machine's matrix rates, so each row's TFLOP/s reads as a fraction of what this machine can do.
    n = 256 if args.tiny else 2048
    info["matmul_tflops"] = {dtype_name(d): matmul_tflops(d, device, n)
                             for d in dict.fromkeys([torch.float32, torch.bfloat16, *dtypes])}
    info["matmul_n"] = n
    print("matmul rate (" + f"{n}x{n}): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in info["matmul_tflops"].items()),
          flush=True)
    bench = Bench(args, device, info["matmul_tflops"])
    sd1 = bool(set(args.rows) & {"unet256", "unet512", "vae", "text", "txt2img"})
    per_dtype = sd1 or "sd2" in args.rows or "upscale" in args.rows
    if per_dtype and device.type == "cpu" and torch.bfloat16 in dtypes and not cpu_has_bf16():
        bench.note("this CPU has no native bfloat16 (AVX-512 BF16, AMX or ARM BF16): bfloat16 rows run emulated")
    if per_dtype and device.type == "cpu" and torch.float16 in dtypes:
        bench.note("float16 on a CPU: ldm's own policy would use bfloat16 or float32 instead; timed as asked")
    if "sd2" in args.rows and args.sd2_size != 768:
        bench.note(f"sd2 row at {args.sd2_size}x{args.sd2_size} instead of the 768-v model's native 768x768")
    # ldm.load applies its backend policy (on CUDA in float32: TF32 off) once per process; both libraries
    # run under it here, so the comparison is of the code, not of the flags.
    configure_backends(Placement(device, torch.float32 if torch.float32 in dtypes or not dtypes else dtypes[0]))
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        tmp = Path(tmp)
        if "load" in args.rows:
            load_rows(bench, args, shared, tmp)
        if sd1 and dtypes:
            sd1_rows(bench, args, shared, dtypes, tmp)
        if "sd2" in args.rows:
            sd2_rows(bench, args, shared, dtypes or [torch.float32])
        if "upscale" in args.rows:
            upscale_rows(bench, args, shared, dtypes or [torch.float32], tmp)
    info.update({k: v for k, v in machine(device).items() if "tf32" in k})
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                      if not k.startswith(("load_child", "ckpt"))},
            "rows": bench.rows, "notes": bench.notes}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
