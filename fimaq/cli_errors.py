"""Bad command lines and configs as one ``error:`` line: which file, which key, what is wrong.

jsonargparse reports a bad key as a multi-line block (the Union types it tried, the usage of every
option); :func:`config_error` keeps what a user needs. YAML files named with ``-c`` are read first, so
that a syntax error names the file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from fimaq.errors import FimaqError


def config_files(args: list[str]) -> list[Path]:
    """The files given with ``-c``/``--config`` on a command line."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            found.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            found.append(Path(arg.split("=", 1)[1]))
    return found


def check_yaml_files(args: list[str]) -> list[dict]:
    """Read every ``-c`` file; a missing file or a YAML syntax error becomes one FimaqError naming the
    file, line and column. Returns the parsed files (for locating keys in error messages)."""
    loaded = []
    for path in config_files(args):
        try:
            text = path.read_text()
        except OSError as exc:
            raise FimaqError(f"cannot read config {path}: {exc.strerror or exc}") from None
        try:
            loaded.append(yaml.safe_load(text) or {})
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise FimaqError(f"config {path}{where}: YAML syntax error: {problem}") from None
    return loaded


def _in_file(key: str, files: list[Path], loaded: list[dict]) -> str:
    for path, data in zip(files, loaded, strict=False):
        node = data
        for part in key.split("."):
            if isinstance(node, dict) and part == "init_args" and part not in node:
                continue
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return f"in {path}"
    return "on the command line"


def config_error(message: str, args: list[str]) -> str:
    """One line from jsonargparse's message: the key, where it was given and the first real problem."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    problems = [
        line.removeprefix("- ")
        for line in lines[1:]
        if not line.startswith(
            ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
        )
        and "NoneType" not in line
    ]
    nested = [re.match(r'Parser key "([^"]+)"', p) for p in problems]
    full = key.group(1) if key else ""
    detail = problems[-1] if problems else (lines[0] if lines else message)
    for match in nested:
        if match:
            full = f"{full}.{match.group(1)}" if full else match.group(1)
    option = re.search(r"Option '([^']+)' is not accepted", detail) or re.search(
        r"Key '([^']+)' is not expected", detail
    )
    if option:
        name = option.group(1)
        full = name if name.startswith(full) or not full else f"{full}.{name}"
        detail = "no such option"
    detail = re.sub(r"<class '([\w.]+)'>", r"\1", detail).removeprefix("Problem with given class_path ")
    expected = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", detail)
    if expected:
        kind, got = expected.groups()
        choices = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
        if choices:
            kind = "one of " + ", ".join(c.strip().strip("'") for c in choices.group(1).split(","))
        detail = f"expected {kind}, got {got!r}"
    if not full:
        return detail
    return f"{full} ({_where(full, args)}): {detail}{_yaml_hint(_given(full, args))}"


def _given(key: str, args: list[str]) -> str | None:
    """The value given for ``--key`` on the command line (``--key=value`` or ``--key value``)."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
        if arg == f"--{key}" and i + 1 < len(args):
            return args[i + 1]
    return None


def _yaml_hint(value: str | None) -> str:
    """What to change in a YAML mapping written without a space after a colon (``{a:1}`` is a mapping
    of the single key ``"a:1"`` to nothing)."""
    if value is None or not re.search(r"[{,]\s*[\w.-]+:[^\s/]", value):
        return ""
    fixed = re.sub(r"([{,]\s*[\w.-]+):(?=[^\s/])", r"\1: ", value)
    fixed = re.sub(r",(?=\S)", ", ", fixed)
    return f" (YAML needs a space after each colon: {fixed})"


def _where(key: str, args: list[str]) -> str:
    """Where ``key`` was set: on the command line (which wins), else in which ``-c`` file."""
    for arg in args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name and (key == name or key.startswith(name + ".")):
            return "on the command line"
    files = config_files(args)
    return _in_file(key, files, check_yaml_files(args)) if files else "on the command line"


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser, raising :class:`FimaqError` with :func:`config_error`'s line where it
    would print the usage block and exit (``--help`` still prints everything)."""

    args: list[str] = []

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        raise FimaqError(config_error(message, OneLineParser.args)) from None
