"""Prompt editing `[from:to:when]` and alternation `[a|b]`, as AUTOMATIC1111 reads them (its default
settings: the "new" timelines, no hires pass): which text each sampling step conditions on.

`schedule(prompt, steps)` is A1111's `get_learned_conditioning_prompt_schedules` for one prompt: a list of
`(end_at_step, text)`, the text used while the step counter is <= end_at_step. The step counter counts the
steps of the run from 0, as A1111's denoiser does (`text_at(entries, i)`), so `a [b:3]` uses "a " for
steps 0..3 and "a b" from step 4 on, and `[a|b]` uses a, a, b, a, b, ...

The grammar is A1111's:
    start:      (prompt | stray bracket or colon)*      a `|` outside an alternation, or a lone trailing
    prompt:     (emphasized | scheduled | alternate | plain)*      backslash, is no parse: the prompt is
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"           then used verbatim
    scheduled:  "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
    alternate:  "[" prompt ("|" [prompt])+ "]"
    plain:      (any character but \\ [ ] ( ) : |, or a backslash and the next character)+
`when` written with a "." is a fraction of `steps` (`0.25` of 20 -> 5), otherwise a step number; either
is cut to at most `steps` and truncated to an integer. Emphasis brackets stay in the text: the weights are
read afterwards, from each step's text (ldm/prompts.py). Written as a small recursive-descent parser (no
parser generator), trying at a `[` the scheduled, then the alternate, then the emphasized form.
"""
from __future__ import annotations

import re
from typing import Optional, Union

PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
SPACE = re.compile(r"\s*")
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
STRAY = "[]():"  # what the top level may hold outside any construct, as text

# A parsed prompt is a list of nodes: text, or ("edit", before, after, when) / ("alt", options), whose
# parts are node lists themselves (before None when the form is [to:when]).
Node = Union[str, tuple]
Nodes = list


def _prompt(s: str, i: int) -> tuple[Nodes, int]:
    """The longest run of prompt elements from i (possibly none)."""
    nodes: Nodes = []
    while i < len(s):
        if s[i] in "([":
            got = _bracketed(s, i)
            if got is None:
                break
            node, i = got
            nodes.extend(node)
            continue
        m = PLAIN.match(s, i)
        if not m:
            break
        nodes.append(m.group())
        i = m.end()
    return nodes, i


def _when(s: str, i: int) -> Optional[tuple[str, int]]:
    """[ws] NUMBER [ws] "]" from i: (the number as written, the position after the "]")."""
    i = SPACE.match(s, i).end()
    m = NUMBER.match(s, i)
    if not m:
        return None
    j = SPACE.match(s, m.end()).end()
    return (m.group(), j + 1) if s.startswith("]", j) else None


def _bracketed(s: str, i: int) -> Optional[tuple[Nodes, int]]:
    """The construct opening at s[i] ("(" or "["): its nodes and the position after it, or None."""
    first, j = _prompt(s, i + 1)
    if s[i] == "(":
        if s.startswith(")", j):
            return ["(", *first, ")"], j + 1
        if s.startswith(":", j):
            second, k = _prompt(s, j + 1)
            if s.startswith(")", k):
                return ["(", *first, ":", *second, ")"], k + 1
        return None
    if s.startswith(":", j):
        after, k = _prompt(s, j + 1)
        if s.startswith(":", k) and (end := _when(s, k + 1)):   # [from:to:when]
            return [("edit", first, after, end[0])], end[1]
        if end := _when(s, j + 1):                               # [to:when]
            return [("edit", None, first, end[0])], end[1]
        return None
    if s.startswith("|", j):
        options = [first]
        while s.startswith("|", j):
            option, j = _prompt(s, j + 1)
            options.append(option)
        return ([("alt", options)], j + 1) if s.startswith("]", j) else None
    return (["[", *first, "]"], j + 1) if s.startswith("]", j) else None


def parse_schedule(prompt: str) -> Optional[Nodes]:
    """The prompt's nodes, or None where A1111's grammar has no parse (the prompt is then used as it is).

    The top level is ambiguous (a construct there may also be read as stray brackets and text): this takes
    the construct. lark's Earley parser, A1111's, agrees on its doctests and on random prompts, but not on
    every tangle of stray brackets: it reads e.g. `[a:3]::` or `[[a:3]]:` (an edit followed by two or more
    of `[]():`) as text."""
    nodes: Nodes = []
    i = 0
    while i < len(prompt):
        part, j = _prompt(prompt, i)
        nodes.extend(part)
        if j == i:
            if prompt[i] not in STRAY:
                return None
            nodes.append(prompt[i])
            j = i + 1
        i = j
    return nodes


def _step_of(when: str, steps: int) -> int:
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _switches(nodes: Nodes, steps: int, out: set) -> None:
    for node in nodes:
        if isinstance(node, str):
            continue
        if node[0] == "alt":
            out.update(range(1, steps + 1))
            for option in node[1]:
                _switches(option, steps, out)
            continue
        step = _step_of(node[3], steps)
        if step >= 1:
            out.add(step)
        for part in node[1:3]:
            if part is not None:
                _switches(part, steps, out)


def _text(nodes: Nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "alt":
            options = node[1]
            out.append(_text(options[(step - 1) % len(options)], step, steps))
        else:
            _, before, after, when = node
            part = (before or []) if step <= _step_of(when, steps) else after
            out.append(_text(part, step, steps))
    return "".join(out)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_at_step, text), ...] in step order, the last ending at `steps`."""
    nodes = parse_schedule(prompt)
    if nodes is None:
        return [(steps, prompt)]
    switches = {steps}
    _switches(nodes, steps, switches)
    return [(step, _text(nodes, step, steps)) for step in sorted(switches)]


def entry_at(entries: list[tuple[int, str]], step: int) -> int:
    """The index of the entry in force at step `step` (counted from 0): the first that ends at or after it;
    past the last end (a sampler running more steps than asked, as DDIM's spacing may), the last."""
    return next((k for k, (end, _) in enumerate(entries) if step <= end), len(entries) - 1)
