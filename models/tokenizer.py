"""Prompt -> token ids, with the CLIP BPE that open_clip ships (the same vocabulary for SD 1.x and 2.x).

The two families differ only in the padding id: SD 1.x (HF CLIPTokenizer) pads with <|endoftext|>
49407, SD 2.x (open_clip.tokenize) with 0. The encoders are causal, so the padding never changes
the embeddings of the prompt's own tokens, but it does change the padded positions the UNet sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

START, END = 49406, 49407

_bpe = None


def open_clip_folder() -> Path:
    """The installed open_clip package's folder, found without running its __init__ (which imports
    torchvision, timm and its model zoo: seconds at every start). Its tokenizer.py and the model configs
    in model_configs/ need none of that."""
    import importlib.util

    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed; pip install open_clip_torch (its BPE vocabulary "
                          "is the tokenizer of both SD 1.x and SD 2.x)")
    return Path(list(package.submodule_search_locations)[0])


def _open_clip_tokenizer_module():
    """open_clip's tokenizer.py on its own: it imports only the standard library, ftfy, regex, numpy and
    torch, and finds its vocabulary beside itself."""
    import importlib.util
    import sys

    name = "open_clip.tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location("ldm_open_clip_tokenizer", open_clip_folder() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _simple_tokenizer():
    # Reading the 49k merges takes a noticeable fraction of a second: build once per process.
    global _bpe
    if _bpe is None:
        _bpe = _open_clip_tokenizer_module().SimpleTokenizer()
    return _bpe


class Tokenizer:
    """`Tokenizer(pad_token)(prompts) -> LongTensor[B, context_length]`:
    [<start>, bpe ids..., <end>, pad...], text cleaned and lower-cased as open_clip does; a long prompt
    is cut to `context_length` with <end> kept last."""

    def __init__(self, pad_token: int, context_length: int = 77):
        self.pad_token = pad_token
        self.context_length = context_length

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without <start>/<end> and untruncated."""
        return _simple_tokenizer().encode(prompt)

    def __call__(self, prompts: Union[list[str], str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.context_length), self.pad_token, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = [START] + self.encode(prompt)[: self.context_length - 2] + [END]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def tokenizer_for(text_cfg) -> Tokenizer:
    """The tokenizer of a text tower: every text config names its pad token and context length."""
    return Tokenizer(text_cfg.pad_token, text_cfg.context_length)
