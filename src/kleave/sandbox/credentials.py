"""Where credentials live, and whether a path or a piece of text points at one.

Both the tool policy (file requests, exec arguments) and skill vetting (bundled scripts) ask
the same question, so the answer lives here once. Paths are compared after expansion (``~``,
``$HOME``) and after resolution (``/var/run`` is a symlink to ``/run`` on most systems); text
is scanned for the written forms, including a bare ``.ssh/`` component, which is how a command
run from the home directory names the key directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Characters that continue a path name: a match must not sit inside a longer name.
_NAME_CHAR = r"[A-Za-z0-9_.@+-]"
_HOME_FORMS = r"(?:~|\$HOME|\$\{HOME\})"


@dataclass(frozen=True)
class DeniedLocation:
    """One denied entry as written, and every absolute form it may take."""

    spec: str
    absolutes: tuple[str, ...]
    """Expanded (for each home) and resolved forms, without a trailing slash."""
    home_relative: str | None
    """For ``~/`` entries, the part after ``~/`` (".ssh"): matched as a path component run."""


def is_within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it, for normalized absolute paths."""
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


class CredentialMatcher:
    """Answers "does this path or text reach a denied location?" naming the entry matched."""

    def __init__(
        self,
        denied: Iterable[str],
        homes: Sequence[Path],
        extra: Iterable[Path] = (),
    ) -> None:
        locations: list[DeniedLocation] = []
        for spec in dict.fromkeys(denied):  # de-duplicated, order kept
            locations.append(_location(spec, homes))
        for path in extra:
            absolute = os.path.normpath(os.path.abspath(path))
            forms = tuple(dict.fromkeys([absolute, os.path.realpath(absolute)]))
            locations.append(DeniedLocation(str(path), forms, None))
        self.locations: tuple[DeniedLocation, ...] = tuple(locations)
        self._text_patterns = [(location, _text_pattern(location)) for location in self.locations]

    def path_match(self, path: str) -> str | None:
        """The denied entry an absolute path falls under, lexically or once resolved."""
        lexical = normalize(path)
        candidates = dict.fromkeys([lexical, os.path.realpath(lexical)])
        for location in self.locations:
            for candidate in candidates:
                if any(is_within(candidate, form) for form in location.absolutes):
                    return location.spec
        return None

    def text_match(self, text: str, *, cwd: str | None = None) -> str | None:
        """The denied entry a piece of text (an argument, a script line) refers to.

        Catches the written forms (``~/.aws``, ``$HOME/.aws``, ``/root/.aws``, ``.aws/``) and,
        given ``cwd``, path-like tokens that resolve into a denied location from there
        (``../../etc/shadow``). Obfuscation through a shell defeats any text scan; that is why
        shells need the template's explicit opt-in and why the pod mounts no credentials.
        """
        for location, pattern in self._text_patterns:
            if pattern.search(text):
                return location.spec
        for token in _PATH_TOKEN.findall(text):
            if token.startswith("/"):
                candidate = token
            elif cwd is not None and not token.startswith("~"):
                candidate = f"{cwd}/{token}"
            else:
                continue  # "~/..." forms are the patterns' job; no base to resolve against
            match = self.path_match(normalize(candidate))
            if match is not None:
                return match
        return None


def normalize(path: str) -> str:
    """``os.path.normpath`` that also folds a leading "//" (POSIX keeps it, the kernel does not)."""
    return os.path.normpath(re.sub(r"/+", "/", path))


def _location(spec: str, homes: Sequence[Path]) -> DeniedLocation:
    if spec == "~" or spec.startswith("~/"):
        rest = spec[2:]
        forms: list[str] = []
        for home in homes:
            absolute = os.path.normpath(os.path.join(os.path.abspath(home), rest))
            forms += [absolute, os.path.realpath(absolute)]
        return DeniedLocation(spec, tuple(dict.fromkeys(forms)), rest or None)
    absolute = os.path.normpath(spec)
    return DeniedLocation(spec, tuple(dict.fromkeys([absolute, os.path.realpath(absolute)])), None)


def _text_pattern(location: DeniedLocation) -> re.Pattern[str]:
    end = rf"(?!{_NAME_CHAR})"
    alternatives = [
        rf"(?<!{_NAME_CHAR}){re.escape(form)}{end}" for form in location.absolutes if form != "/"
    ]
    if location.home_relative is not None:
        rel = re.escape(location.home_relative)
        alternatives.append(rf"{_HOME_FORMS}/{rel}{end}")
        # ".ssh" as a path component anywhere: "cd ~ && cat .ssh/id_rsa", "x/.aws/config".
        alternatives.append(rf"(?<!{_NAME_CHAR}){rel}{end}")
    return re.compile("|".join(alternatives))


# Substrings that look like paths: they contain a slash.
_PATH_TOKEN = re.compile(r"[A-Za-z0-9_.@%+~/-]*/[A-Za-z0-9_.@%+~/-]*")
