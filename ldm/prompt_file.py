"""The prompts of a run, as batches: --prompt n_samples times, or --from-file's lines (the original's one prompt a
line, or AUTOMATIC1111's "prompts from file" form with its own negative prompt and seed), and the check that
every one of them parses under --prompt-syntax a1111. All before any weights are read."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Optional

from .errors import UsageError
from .prompts import check_prompts


@dataclass(frozen=True)
class PromptLine:
    """What an A1111 "prompts from file" line of --from-file sets for its batch (None: the flag's value)."""
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None


def _a1111_line(line: str, where: str) -> tuple[str, PromptLine]:
    """A line of A1111's "prompts from file" script: --prompt and --negative_prompt take the words up to the
    next --flag (joined by spaces, as the script joins them), --seed a number."""
    import shlex

    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UsageError(f"{where}: {e}; quote the line's texts as a shell would") from None
    found: dict = {}
    i = 0
    while i < len(words):
        flag = words[i]
        if flag not in ("--prompt", "--negative_prompt", "--seed"):
            raise UsageError(f"{where}: {flag} is not taken here; a line takes --prompt, --negative_prompt and "
                             "--seed (give the other settings as the command's flags)")
        j = i + 1
        while j < len(words) and not words[j].startswith("--"):
            j += 1
        if j == i + 1:
            raise UsageError(f"{where}: {flag} needs a value")
        value = " ".join(words[i + 1:j])
        if flag == "--seed":
            try:
                found["seed"] = int(value)
            except ValueError:
                raise UsageError(f"{where}: --seed {value}: must be a whole number") from None
        else:
            found[flag[2:]] = value
        i = j
    if "prompt" not in found:
        raise UsageError(f"{where}: has no --prompt")
    return found.pop("prompt"), PromptLine(**found)


def read_prompts(args) -> tuple[list[list[str]], tuple]:
    """(batches of prompts, their PromptLines), as the original: one batch of n_samples copies, or the file's
    lines in chunks of n_samples; an A1111 line (one that starts with --) is a batch of n_samples copies."""
    if not args.from_file:
        for text, flag in ((args.prompt, "--prompt"), (args.negative_prompt, "--negative-prompt")):
            try:
                text.encode("utf-8")  # bytes that are not UTF-8 reach argv as lone surrogates
            except UnicodeEncodeError:
                raise UsageError(f"{flag}: is not valid UTF-8 text; pass it in UTF-8 (or use --from-file)") from None
        return [args.n_samples * [args.prompt]], ()
    path = Path(args.from_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; --from-file takes a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}); --from-file takes a "
                         "text file with one prompt per line") from None
    if not lines:
        raise UsageError(f"{path}: has no prompts; write one prompt per line")
    batches, settings, plain = [], [], []

    def flush() -> None:  # the last batch may be short; the original crashes there, we run it at its own size
        it = iter(plain)
        for batch in iter(lambda: tuple(islice(it, args.n_samples)), ()):
            batches.append(list(batch))
            settings.append(None)
        plain.clear()

    for number, line in enumerate(lines, 1):
        if not line.strip().startswith("--"):
            plain.extend(args.repeat * [line])
            continue
        flush()
        prompt, setting = _a1111_line(line, f"{path} line {number}")
        for _ in range(args.repeat):
            batches.append(args.n_samples * [prompt])
            settings.append(setting)
    flush()
    return batches, tuple(settings) if any(settings) else ()


def check_prompt_syntax(args, batches: list[list[str]], lines: tuple) -> None:
    """With --prompt-syntax a1111, every prompt and negative prompt must parse (a weight such as (a:1.2.3)
    is refused here, not after the weights are read)."""
    if args.prompt_syntax != "a1111":
        return
    texts = {p for batch in batches for p in batch} | {args.negative_prompt or ""}
    texts |= {line.negative_prompt for line in lines if line is not None and line.negative_prompt is not None}
    try:
        check_prompts(sorted(texts), args.ddim_steps)
    except ValueError as e:
        raise UsageError(f"--prompt-syntax a1111: {e}") from None
