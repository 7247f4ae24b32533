"""Input checks shared by train_tdm.py, infer_tdm.py and eval_tdm.py: one conversion and range per
flag for the command line and YAML alike, names refused with the nearest one, and output paths
checked before any work.

A flag's `type` is a `Number` or a `Choice`: argparse calls it on a command-line string, `from_yaml`
converts a YAML value through the same object, and `check` validates a value set in code
(`RunConfig.replace`); so every source gets the same conversion and the same range.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
import re
import sys
import tempfile
from typing import Callable, Iterable, Optional, Sequence, Union


class UsageError(ValueError):
    """Bad input, reported as one line and exit code 2 before any work is done."""


def did_you_mean(value, names: Iterable) -> str:
    near = difflib.get_close_matches(str(value), [str(n) for n in names], n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type where the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_error(flag: str, name: str, error: BaseException) -> UsageError:
    """A model (hub id or folder) that cannot be loaded, as one line: the error's first line, or
    where the hub could not be reached and the model is not in the local cache, that and the fix."""
    return UsageError(f"{flag} {name}: {offline_hint(error) or first_line(error)}")


def offline_hint(error: BaseException) -> str:
    """Why and what to do when `error` (or an error it was raised from) says that a file was
    neither reachable on the hub nor in the local cache: offline mode, or no network; "" for
    any other error."""
    markers = ("LocalEntryNotFoundError", "OfflineModeIsEnabled")   # datasets names it in its message
    found, seen = False, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = found or type(error).__name__ in markers or any(m in str(error) for m in markers)
        error = error.__cause__ or error.__context__
    if not found:
        return ""
    fix = "give a local folder, or download it once with network access"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return (f"not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (offline mode): "
                f"{fix} (HF_HUB_OFFLINE=0)")
    return f"not in the local Hugging Face cache, and the hub cannot be reached (no network?): {fix}"


def flag_error(name: str, error) -> str:
    """"--x must be …" for a range, "--x: unknown …" for anything else."""
    return f"{name} {error}" if str(error).startswith("must ") else f"{name}: {error}"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help lists each flag's default value where it has one (not None, not off), also for
    flags without a help text."""

    @staticmethod
    def _shows_default(action) -> bool:
        return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action = copy.copy(action)   # argparse prints no help line for an empty help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if "%(default)" in (action.help or "") or not self._shows_default(action):
            return action.help
        return f"{action.help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line, exit 2 in the scripts) instead of
    printing the usage; an unknown flag is answered with the nearest one, a flag with aliases is
    named as it was typed, and --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._typed: Sequence[str] = ()

    def error(self, message):
        # "argument --a/--b: must be …" → "--b must be …" (--b as typed); argparse's own messages
        # keep a colon
        match = re.match(r"^argument (\S+): ", message)
        if match:
            message = f"argument {self.typed_name(match[1])}: {message[match.end():]}"
        message = re.sub(r"^argument (\S+): must ", r"\1 must ", message)
        raise UsageError(re.sub(r"^argument ", "", message))

    def typed_name(self, names: str) -> str:
        """Of a flag's aliases ("--a/--b"), the one on the command line (else the first)."""
        aliases = names.split("/")
        for arg in self._typed:
            for alias in aliases:
                if arg == alias or arg.startswith(alias + "="):
                    return alias
        return aliases[0]

    def parse_known_args(self, args=None, namespace=None):
        self._typed = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [option for action in self._actions for option in action.option_strings]
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}"
                             f"{did_you_mean(extras[0].split('=')[0], flags)}")
        return namespace


class Number:
    """An argparse `type`: an int or a finite float within bounds (`above`/`below` exclusive,
    `low`/`high` inclusive). `hint` follows the range in the message."""

    def __init__(self, kind=int, low=None, high=None, above=None, below=None, hint: str = ""):
        self.kind, self.low, self.high, self.above, self.below = kind, low, high, above, below
        self.hint = hint
        self.__name__ = kind.__name__   # argparse names the type by it in its own messages

    @property
    def noun(self) -> str:
        return "an integer" if self.kind is int else "a number"

    def bounds(self) -> str:
        parts = [f"{sign} {limit}" for sign, limit in ((">=", self.low), (">", self.above),
                                                       ("<=", self.high), ("<", self.below))
                 if limit is not None]
        return " and ".join(parts)

    def __call__(self, text: str):
        """A command-line string."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.noun}, got {text!r}") from None
        return self.check(value)

    def check(self, value):
        """A typed value, unchanged, or ArgumentTypeError naming the range."""
        inside = (math.isfinite(value)
                  and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                  and (self.above is None or value > self.above)
                  and (self.below is None or value < self.below))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {self.bounds() or 'finite'}{self.hint}, got {value}")
        return value

    def from_yaml(self, value):
        """A YAML value: a string is read as on the command line; a float for an integer flag,
        or a boolean for any number, is refused (YAML's 16.0 is not the integer 16)."""
        if isinstance(value, str):
            return self(value)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (whole or (self.kind is float and isinstance(value, float))):
            raise argparse.ArgumentTypeError(f"must be {self.noun}, got {value!r}")
        return self.check(self.kind(value))


class Choice:
    """An argparse `type`: one of a set of names, given or read from what is installed when first
    needed (`names` a callable); `yaml_values` maps YAML values that stand for a name (on → True)."""

    def __init__(self, names: Union[Sequence[str], Callable[[], Sequence[str]]], yaml_values=None):
        self._names = names
        self.yaml_values = yaml_values or {}
        self.__name__ = "name"

    @property
    def names(self) -> Sequence[str]:
        return self._names() if callable(self._names) else self._names

    def __call__(self, text: str) -> str:
        names = self.names
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {text!r}{did_you_mean(text, names)} "
                                             f"(choose from {', '.join(names)})")
        return text

    check = __call__

    def from_yaml(self, value):
        for yaml_value, name in self.yaml_values.items():
            if value is yaml_value or (type(value) is type(yaml_value) and value == yaml_value):
                return name
        if not isinstance(value, str):
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(self.names)}, got {value!r}")
        return self(value)


class Switch(argparse.Action):
    """A setting on or off, named like its flag: `--name` turns it on, `--no_name` off (argparse's
    BooleanOptionalAction spells it --no-name, unlike every other flag here). In YAML, `name: false`
    or `no_name: true` (`yaml_value`)."""

    def __init__(self, option_strings, dest, default=None, **kwargs):
        negatives = [f"--no_{option[2:]}" for option in option_strings if option.startswith("--")]
        super().__init__([*option_strings, *negatives], dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not self.negative(option_string))

    @staticmethod
    def negative(option_string: str) -> bool:
        return option_string.startswith("--no_")

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def choice(*names: str) -> dict:
    """add_argument keywords of a flag with fixed names: checked by Choice (with "did you mean"),
    listed in --help by argparse's choices."""
    return {"type": Choice(names), "choices": names}


def yaml_value(action: argparse.Action, value):
    """A YAML value for a flag, converted and checked as argparse would convert the command line's
    string (ArgumentTypeError otherwise)."""
    if value is None:
        if None in getattr(action.type, "yaml_values", {}):   # null stands for a name (auto)
            return action.type.yaml_values[None]
        if action.default is None:
            return None
        raise argparse.ArgumentTypeError("must have a value, got null")
    if action.nargs == 0:   # store_true: YAML true/false only ("no" is already false in YAML)
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        return [yaml_item(action, item) for item in (value if isinstance(value, list) else [value])]
    return yaml_item(action, value)


def yaml_item(action: argparse.Action, value):
    convert = getattr(action.type, "from_yaml", None)
    if convert is not None:
        return convert(value)
    if action.type is None:   # a string flag: a YAML number is its text (a revision, a name)
        if isinstance(value, (bool, list, dict)):
            raise argparse.ArgumentTypeError(f"must be a string, got {value!r}")
        return str(value)
    return action.type(value)   # its own conversion takes the YAML form (int_list, yaml_mapping)


def check_values(args, parser: argparse.ArgumentParser) -> None:
    """Every Number and Choice flag of `args` within its range / names (values set in code)."""
    for action in parser._actions:
        check = getattr(action.type, "check", None)
        value = getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        try:
            for item in (value if isinstance(value, list) else [value]):
                check(item)
        except argparse.ArgumentTypeError as error:
            raise UsageError(flag_error(action.option_strings[0], error)) from None


def check_writable_folder(flag: str, folder: str, what: Optional[str] = None) -> None:
    """Fail now, not after hours of work, if nothing can be written there (creates nothing: the
    folder, or the nearest existing folder above it, must take a file)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {what or folder} is not writable ({error.strerror or error}); "
                         "choose another folder") from None


def check_output_file(flag: str, path: str, extensions: Sequence[str], named: str = "") -> None:
    """An output file: one of `extensions` (`named`: how the message lists them), and a folder
    it can be written to."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise UsageError(f"{flag} {path}: unknown file type {ext or '(none)'!r}; use "
                         f"{named or ', '.join(extensions)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable_folder(flag, os.path.dirname(os.path.abspath(path)), what=path)


def image_extensions() -> tuple:
    """Extensions Pillow can write here."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE))
