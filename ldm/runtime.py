"""The run-time set-up of a command: load the model as the flags ask, with the memory options and
`--compile`, and check that it agrees with the flags. The commands (ldm/generate.py, ldm/filmstrip.py)
call `load_for_run`; what they sample and write is theirs.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import set_attention_slicing
from models.prepack import plain_linears, unpack_convolutions
from models.tiling import enable_vae_tiling

from .device import Placement, configure_backends
from .errors import UsageError
from .loading import LatentDiffusion, load
from .memory import available_bytes, refusal
from .offload import enable_lowvram
from .options import RunPlan, check_model


def compile_unet(unet: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile for sampling; on the CPU with freezing, so inductor folds the weights in as constants.

    Whether it pays depends on the device, the dtype and the CPU (measured in the README; `tools/bench.py
    --compile` measures it on yours): on the CPU it can lose to ldm's prepacked eager convolutions.
    """
    unpack_convolutions(unet), plain_linears(unet)  # the compiler picks its own kernels: free the cached copies
    return torch.compile(unet, options={"freezing": True} if device.type == "cpu" else None)


def load_for_run(args, plan: RunPlan, check=check_model) -> LatentDiffusion:
    """ldm.load with the memory options, checked against the flags (`check(model, args)`: options.check_model
    for txt2img/img2img, the special commands' own in ldm/special_options.py).

    --lowvram loads onto the CPU in the compute dtype and lends each network to the accelerator only
    while it runs (on a CPU-only run it drops the reordered weight copies of models/prepack.py instead);
    --attention-slicing and --vae-tiling bound the peaks; --compile compiles the UNet on
    its first step (the shapes are fixed per run).
    """
    placement = plan.placement
    offload = args.lowvram and placement.device.type != "cpu"
    where = Placement(torch.device("cpu"), placement.dtype, placement.notes) if offload else placement
    model = load(plan.ckpt, config=args.config, device=where, ema=args.ema, prediction=args.prediction,
                 vae=args.vae)
    check(model, args)  # before any option touches the networks: a wrong --f is one line, not a stack
    if offload:
        configure_backends(placement)
        enable_lowvram(model, placement.device)
    elif args.lowvram:  # on the CPU: no second, reordered copy of the big convolutions' weights
        unpack_convolutions(model.unet), unpack_convolutions(model.vae)
        model.notes.append("--lowvram on the CPU: the convolutions run without their oneDNN weight copies "
                           "(about half the UNet's size less memory, slower steps)")
    if args.attention_slicing:
        set_attention_slicing(model.unet, args.attention_slicing)
        set_attention_slicing(model.vae, args.attention_slicing)
    if args.vae_tiling:
        enable_vae_tiling(model.vae)
    check_fits(model, plan)
    if args.compile:
        model.unet = compile_unet(model.unet, placement.device)
        if placement.device.type == "cpu" and placement.dtype == torch.float32:
            model.notes.append("--compile in float32 on the CPU was measured slower than without it; it pays in "
                               "bfloat16, on CPUs that have it (README)")
    return model


def check_fits(model: LatentDiffusion, plan: RunPlan) -> None:
    """Refuse a size whose activations cannot fit in the memory left after loading (ldm/memory.py)."""
    device = plan.placement.device
    budget = available_bytes(device)
    if budget is None:
        return
    unet_dtype = next(model.unet.parameters()).dtype
    vae_dtype = model.vae.post_quant_conv.weight.dtype
    line = refusal(model.config, max(map(len, plan.batches)), plan.height, plan.width, budget, device,
                   unet_itemsize=unet_dtype.itemsize, vae_itemsize=vae_dtype.itemsize,
                   vae_tile=model.vae.tiling.tile if model.vae.tiling is not None else None)
    if line:
        raise UsageError(line)
