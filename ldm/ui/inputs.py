"""The page's image inputs. Gradio opens an upload with PIL before any handler runs, and a file that is no
image (a text file named .png, a truncated download) becomes a screenful of Gradio internals in the page and
a traceback in the server's terminal. `readable` makes an input say it in one line instead. (It wraps the
component's own preprocess rather than subclassing: a Gradio component subclass writes a .pyi stub beside
its module at import time.)"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import UnidentifiedImageError


def _name(payload) -> str:
    for part in (payload, getattr(payload, "background", None)):
        path = getattr(part, "orig_name", None) or getattr(part, "path", None)
        if path:
            return Path(path).name
    return "the upload"


def readable(component):
    """`component` (a gr.Image or gr.ImageEditor), whose unreadable upload is a gr.Error naming the file."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # PIL's errors for a damaged file
            raise gr.Error(f"{_name(payload)} is not an image this page can read: upload a PNG, JPEG or WebP",
                           print_exception=False) from None

    component.preprocess = checked
    return component
