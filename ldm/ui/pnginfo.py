"""The PNG info tab: the A1111 `parameters` text of a PNG (ours or A1111's) back into the txt2img form's fields."""
from __future__ import annotations

import re

_ITEM = re.compile(r'\s*([\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """{prompt, negative_prompt, steps, sampler, scale, seed, width, height} from an infotext (missing keys
    left out); the last line holds the `Key: value` items, the lines before it the prompts."""
    lines = text.strip().split("\n")
    settings_line = lines.pop() if lines and re.match(r"^\s*Steps:", lines[-1]) else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    items = {k.strip(): v.strip().strip('"') for k, v in _ITEM.findall(settings_line)}
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    convert = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("scale", float),
               "Seed": ("seed", int)}
    for key, (name, kind) in convert.items():
        if key in items:
            try:
                out[name] = kind(items[key])
            except ValueError:
                pass
    size = re.fullmatch(r"(\d+)x(\d+)", items.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size[1]), int(size[2])
    return out
