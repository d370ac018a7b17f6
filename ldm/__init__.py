"""ldm: Stable Diffusion 1.x / 2.x inference written from PyTorch primitives.

    model = ldm.load("v1-5-pruned-emaonly.safetensors")
    context = model.text_encoder(model.tokenizer(["a photograph of an astronaut riding a horse"]))
"""
from .device import Placement, resolve
from .loading import LatentDiffusion, load

__all__ = ["load", "LatentDiffusion", "resolve", "Placement"]
