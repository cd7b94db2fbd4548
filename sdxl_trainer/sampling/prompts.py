"""Sample prompts with per-prompt overrides, in the kohya `--sample_prompts` file style.

One prompt per line (or per list entry); blank lines and lines starting with ``#`` are skipped. A
prompt may end in options that override the run's sampling settings for that prompt alone::

    1girl, solo, red dress --n lowres, bad hands --w 832 --h 1216 --d 7 --s 20 --l 4.5

``--n`` negative prompt, ``--w``/``--h`` width/height, ``--d`` (or ``--seed``) seed, ``--s`` (or
``--steps``) sampling steps, ``--l`` (or ``--cfg``) guidance scale — kohya's letters, plus the long
names. An option is recognised as `` --`` followed by its name and a space; anything else is part of
the prompt. Every error names the file and line, so a typo stops the run at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdxl_trainer.errors import UserError

OPTION_NAMES = {"n": "negative", "w": "width", "h": "height", "d": "seed", "seed": "seed", "s": "steps",
                "steps": "steps", "l": "cfg", "cfg": "cfg"}  # fmt: skip
_OPTION = re.compile(r"\s--([a-z]+)(?=\s|$)")


@dataclass(frozen=True)
class PromptLine:
    """One prompt and the settings it overrides (None: the run's ``samples`` setting)."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None


def _number(raw: str, kind: type, *, option: str, where: str) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"--{option} needs a {'whole ' if kind is int else ''}number, got {raw!r}", where=where,
                        fix=f"e.g. --{option} {'1024' if kind is int else '5.0'}") from None  # fmt: skip
    if value < 0 or (option not in ("d", "seed") and value == 0 and kind is int):
        raise UserError(f"--{option} {raw} is out of range", where=where)
    return value


def parse_prompt_line(line: str, *, where: str) -> PromptLine:
    """``prompt --opt value …`` → a :class:`PromptLine`; an unknown option is a UserError naming ``where``."""
    pieces = _OPTION.split(" " + line.strip())
    text, found = pieces[0].strip(), {}
    for name, value in zip(pieces[1::2], pieces[2::2]):
        if name not in OPTION_NAMES:
            raise UserError(f"unknown prompt option --{name}", where=where,
                            fix="use --n (negative), --w, --h, --d (seed), --s (steps) or --l (cfg)")  # fmt: skip
        key, value = OPTION_NAMES[name], value.strip()
        if key in found:
            raise UserError(f"prompt option --{name} given twice", where=where)
        if key == "negative":
            found[key] = value
        else:
            found[key] = _number(value, float if key == "cfg" else int, option=name, where=where)
    if not text:
        raise UserError("a prompt line has options but no prompt", where=where)
    return PromptLine(text=text, **found)


def read_prompt_lines(prompts: list[str] | Path | str) -> list[PromptLine]:
    """The prompts of a list or of a UTF-8 text file, parsed; an unreadable or empty source is a UserError."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the sample prompt file ({type(e).__name__}: {e.args[-1] if e.args else e})",
                            where=str(path), fix="give a UTF-8 text file with one prompt per line, or a "
                            "list in samples.prompts") from None  # fmt: skip
        sources = [(line, f"{path}:{i}") for i, line in enumerate(lines, 1)]
    else:
        sources = [(line, f"samples.prompts[{i}]") for i, line in enumerate(prompts)]
    parsed = [parse_prompt_line(line, where=where) for line, where in sources
              if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    if not parsed:
        raise UserError("the sample prompt list is empty", where=str(prompts) if isinstance(prompts, (str, Path))
                        else "samples.prompts", fix="give at least one prompt, or turn samples off "
                        "(leave samples.every_steps / every_samples unset)")  # fmt: skip
    return parsed
