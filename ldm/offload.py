"""Low-VRAM mode: the networks live in CPU memory and visit the accelerator only while they run.

In the spirit of the "optimizedSD" fork and A1111's `--lowvram`: the text encoder, the VAE's encoder and
decoder, and the UNet (whole, or block by block) are each a unit; a forward pre-hook copies a unit's
tensors to the compute device and a forward hook drops the copies again. The CPU tensors are never
changed, so "moving back" costs no copy. The pipeline is not touched: it still sends its inputs to
`model.placement.device`, and the hooks bring the weights there.

    model = ldm.load(path, device=Placement(torch.device("cpu"), torch.float16))
    offload = enable_lowvram(model, "cuda")   # ... pipeline.txt2img(model, ...) as usual
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from models.prepack import unpack_convolutions

from .loading import LatentDiffusion
from .placing import place_now

Device = Union[str, torch.device]


class _Unit:
    """One module whose tensors are copied to `device` for the duration of each of its forward calls."""

    def __init__(self, module: nn.Module, device: torch.device, store: torch.device, pin: bool):
        self.module, self.device, self.depth, self.loads = module, device, 0, 0
        self.home = []  # (table, name, tensor in the store, is a parameter) for every tensor of the unit
        for mod in module.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in table.items():
                    if t is not None:
                        kept = t.detach().to(store)
                        # Pinned pages let the copy to the GPU run asynchronously, at full bus speed.
                        kept = kept.pin_memory() if pin else kept
                        self.home.append((table, name, kept, table is mod._parameters))
        self._put(lambda t: t)
        self.hooks = [module.register_forward_pre_hook(self._load),
                      module.register_forward_hook(self._unload, always_call=True)]

    def _put(self, convert) -> None:
        for table, name, kept, is_param in self.home:
            t = convert(kept)
            table[name] = nn.Parameter(t, requires_grad=False) if is_param else t

    def _load(self, module, args) -> None:
        self.depth += 1
        if self.depth == 1:
            self.loads += 1
            # copy=True: on a CPU-only machine (the tests) the unit still runs on its own copy.
            self._put(lambda t: t.to(self.device, non_blocking=True, copy=True))

    def _unload(self, module, args, output) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._put(lambda t: t)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self._put(lambda t: t.to(self.device))


class Offload:
    """The handle `enable_lowvram` returns: `units` by name, `loads()` counts the copies to the device
    so far, `remove()` puts every network back on the compute device for good."""

    def __init__(self, units: dict[str, _Unit]):
        self.units = units

    def loads(self) -> dict[str, int]:
        return {name: unit.loads for name, unit in self.units.items()}

    def resident(self) -> list[str]:
        """The units whose weights are on the device right now (inside a forward call)."""
        return [name for name, unit in self.units.items() if unit.depth > 0]

    def remove(self) -> None:
        for unit in self.units.values():
            unit.remove()
        self.units = {}


def _unet_parts(unet: nn.Module) -> dict[str, nn.Module]:
    """The modules UNetModel.forward calls one after the other: the block lists' elements, not the
    lists (an nn.ModuleList is never called, so its hooks would never run)."""
    parts = {}
    for name, child in unet.named_children():
        if isinstance(child, nn.ModuleList):
            parts.update({f"{name}.{i}": block for i, block in enumerate(child)})
        else:
            parts[name] = child
    return parts


def enable_lowvram(model: LatentDiffusion, device: Optional[Device] = None, *, unet_parts: bool = True,
                   store: Device = "cpu") -> Offload:
    """Keep `model`'s networks in `store` (CPU) memory and run each on `device` (default: the model's
    placement device), one at a time; `model.placement.device` becomes `device`, so pipeline calls work
    unchanged. `unet_parts=True` visits the UNet block by block (its largest block, a few tens of MB in
    fp16, instead of the whole 1.7 GB); False moves it whole (A1111's `--medvram`).
    Weights keep their dtype: load in the compute dtype (fp16 for CUDA) before offloading."""
    device = torch.device(device) if device is not None else model.placement.device
    store = torch.device(store)
    pin = device.type == "cuda" and store.type == "cpu"
    for net in (model.text_encoder, model.unet, model.vae):
        place_now(net)  # the units copy the tensors as they are now
        unpack_convolutions(net)  # every visit brings new tensors: CPU packed copies would be remade each time
    modules = {"text_encoder": model.text_encoder}
    modules.update({f"unet.{k}": m for k, m in _unet_parts(model.unet).items()} if unet_parts
                   else {"unet": model.unet})
    modules.update({f"vae.{k}": m for k, m in model.vae.named_children()})
    covered = {id(p) for m in modules.values() for p in m.parameters()}
    for net in (model.text_encoder, model.unet, model.vae):
        left = [n for n, p in net.named_parameters() if id(p) not in covered]
        assert not left, f"parameters outside every offload unit would never reach the device: {left[:3]}"
    units = {name: _Unit(m, device, store, pin) for name, m in modules.items()}
    model.placement = replace(model.placement, device=device)
    return Offload(units)
