"""Prompts as AUTOMATIC1111 reads them ("a1111" prompt syntax, its default settings, "Original" emphasis).

- `parse(text)`: the emphasis of A1111's `parse_prompt_attention`: `(x)` multiplies x's weight by 1.1,
  `[x]` divides it by 1.1, `(x:w)` multiplies it by w, nesting multiplies, unclosed brackets close at the
  end, `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal, `BREAK` (a word) is `("BREAK", -1)`; neighbours of
  equal weight are merged. A list of `(text, weight)`.
- `chunks(parsed, tokenize, comma)`: the token ids in chunks of 75 (A1111's `tokenize_line`): a chunk that
  fills up at a token that is not a comma, with a comma among its last 20 tokens, is cut after that comma
  and the rest moved on to the next chunk; `BREAK` starts a new chunk. Each chunk becomes
  [<start>, 75 ids, <end>], the 75 padded with <end>; the encoder's own pad token (OpenCLIP: 0) then
  replaces everything after the first <end> (A1111's `process_tokens`).
- `encode(model, texts)`: the texts encoded together, one chunk at a time (texts with fewer chunks get
  the empty chunk), each chunk's embeddings multiplied by their tokens' weights and rescaled so that the
  batch's mean is what it was ("Original" emphasis); the chunks concatenated: [len(texts), 77 k, C].

Prompt editing and alternation (ldm/prompt_schedule.py) pick the text of each step; `Conditioning` here
holds the encoded texts of a batch and gives the context of any step.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Optional

import torch

from models.tokenizer import END, START

CHUNK = 75            # prompt tokens per chunk; with <start> and <end>, the encoder's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1
SYNTAXES = ("original", "a1111")

_TOKEN = re.compile(r"""
\\\( | \\\) | \\\[ | \\] | \\\\ | \\      # escapes (a lone backslash is dropped)
| \( | \[                                 # openers
| :\s*([+-]?[.\d]+)\s*\)                  # ":weight)" closes a round bracket with that weight
| \) | ]                                  # closers
| [^\\()\[\]:]+                           # text
| :                                       # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] exactly as A1111's parse_prompt_attention (see the module's docstring)."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            try:
                scale(round_open.pop(), float(weight))
            except ValueError:
                raise ValueError(f"the prompt weight {weight!r} is not a number; write (text:1.2)") from None
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, or a closer or weight with nothing open: text too
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def chunks(parsed: list[tuple[str, float]], tokenize: Callable[[str], list[int]],
           comma: int) -> list[tuple[list[int], list[float]]]:
    """[(77 token ids, 77 weights), ...] of one prompt, padded with <end> (see the module's docstring)."""
    done: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        done.append(([START] + ids + [END] * pad + [END], [1.0] + weights + [1.0] * pad + [1.0]))
        ids, weights, last_comma = [], [], -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenize(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # what follows the comma moves on to the next chunk
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not done:
        close()
    return done


def empty_chunk() -> tuple[list[int], list[float]]:
    return [START] + [END] * (CHUNK + 1), [1.0] * (CHUNK + 2)


def with_pad(ids: list[int], pad: int) -> list[int]:
    """A chunk as its encoder sees it: after the first <end>, the encoder's pad token."""
    first = ids.index(END)
    return ids[:first + 1] + [pad] * (len(ids) - first - 1)


@torch.no_grad()
def encode(model, texts: list[str]) -> torch.Tensor:
    """The texts encoded as one A1111 batch: [len(texts), 77 k, C] (k: the most chunks of any text)."""
    tokenizer = model.tokenizer
    comma = tokenizer.encode(",")[0]
    per_text = [chunks(parse(text), tokenizer.encode, comma) for text in texts]
    out = []
    for c in range(max(len(p) for p in per_text)):
        batch = [p[c] if c < len(p) else empty_chunk() for p in per_text]
        rows = [tuple(with_pad(ids, tokenizer.pad_token)) for ids, _ in batch]
        unique = list(dict.fromkeys(rows))  # a text repeated in the batch (alternation) is encoded once
        tokens = torch.tensor(unique, dtype=torch.long, device=model.placement.device)
        encoded = model.text_encoder(tokens)
        z = encoded[[unique.index(r) for r in rows]].float()
        weights = torch.tensor([w for _, w in batch], dtype=torch.float32, device=z.device)
        before = z.mean()
        z = z * weights[..., None]
        z = z * (before / z.mean())  # restore the batch's mean
        out.append(z.to(encoded.dtype))
    return torch.cat(out, dim=1)


def pad_to(context: torch.Tensor, length: int, filler: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, length, C], filled with copies of `filler` [1, F, C] (T and length: multiples of F)."""
    repeats = (length - context.shape[1]) // filler.shape[1]
    if repeats <= 0:
        return context
    return torch.cat([context, filler.expand(context.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1)


def stack(contexts: list[torch.Tensor]) -> torch.Tensor:
    """[T_i, C] tensors -> [B, max T, C], a shorter one continued with its last vector (A1111's stack_conds)."""
    length = max(c.shape[0] for c in contexts)
    return torch.stack([torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) for c in contexts])


class Conditioning:
    """The a1111 conditioning of a batch of prompts over a run of `steps` steps: each prompt's schedule of
    texts (prompt editing, alternation), encoded prompt by prompt as A1111 does (a prompt's texts in one
    batch, so that the mean restored is that batch's). `at(step)` is the [B, 77 k, C] context of a step
    (counted from 0), `switches` the steps where some prompt's text changes."""

    def __init__(self, model, prompts: list[str], steps: int):
        from .prompt_schedule import schedule

        self.entries, encoded = [], {}
        for prompt in prompts:
            if prompt not in encoded:
                entries = schedule(prompt, steps)
                encoded[prompt] = (entries, encode(model, [text for _, text in entries]))
            self.entries.append(encoded[prompt])
        self.switches = sorted({end + 1 for entries, _ in self.entries for end, _ in entries[:-1]})

    def texts_at(self, step: int) -> list[str]:
        from .prompt_schedule import entry_at

        return [entries[entry_at(entries, step)][1] for entries, _ in self.entries]

    def at(self, step: int) -> torch.Tensor:
        from .prompt_schedule import entry_at

        return stack([z[entry_at(entries, step)] for entries, z in self.entries])


def check_prompts(texts: list[str], steps: int) -> None:
    """Every text each step of these prompts uses parses (a weight such as (a:1.2.3) does not): ValueError."""
    from .prompt_schedule import schedule

    for text in texts:
        for _, step_text in schedule(text, steps):
            parse(step_text)


def check_syntax(syntax: Optional[str]) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    return syntax
