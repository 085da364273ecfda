"""Line scanners for skill files: what hides instructions, encodes payloads, or reaches out.

Each scanner takes text and yields ``(line, code, message)``; ``skills.vet_skill`` decides
which files each applies to and turns them into findings. They are deliberately simple
patterns with low false-positive rates: a skill is plain instructions plus small scripts, and
anything that needs to hide from a human reader is refused rather than explained away.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator

from kleave.sandbox.credentials import CredentialMatcher, is_within, normalize

Hit = tuple[int, str, str]

# Characters that render as nothing or reorder what is shown: text a reviewer cannot see.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
    "\u2028\u2029\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0\U000e0000-\U000e007f]"
)
_HTML_COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)
_BASE64_BLOB = re.compile(r"[A-Za-z0-9+/_-]{256,}={0,2}")

_INSTRUCTION_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), why)
    for pattern, why in (
        (
            r"\b(ignore|disregard|forget|override)\s+(all\s+|any\s+)?(of\s+)?(the\s+|your\s+)?"
            r"(previous|prior|above|earlier|preceding|system|original)\s+"
            r"(instructions?|prompts?|rules|directions|guidelines)",
            "tells the agent to drop its instructions",
        ),
        (
            r"\b(do\s+not|don'?t|never)\s+(tell|inform|notify|alert|warn|show|mention\s+"
            r"(this\s+|it\s+)?to|reveal\s+(this\s+|it\s+)?to|let)\s+the\s+user",
            "tells the agent to keep something from the user",
        ),
        (
            r"\bwithout\s+(telling|informing|asking|notifying|alerting|the\s+knowledge\s+of)"
            r"\s+the\s+user",
            "tells the agent to act behind the user's back",
        ),
        (
            r"\b(hide|conceal)\s+(this|it|these|that)\s+from\s+the\s+user",
            "tells the agent to hide something from the user",
        ),
        (
            r"\b(secretly|silently|covertly|quietly)\s+(run|execute|send|upload|copy|read|post|"
            r"exfiltrate|install|download|curl|fetch)",
            "asks for covert actions",
        ),
        (r"\bexfiltrat(e|ion|ing)\b", "talks about exfiltration"),
        (
            r"\byou\s+are\s+now\s+(in\s+)?(developer|admin|god|jailbreak|dan)\b",
            "tries to switch the agent's role",
        ),
    )
)

# Absolute paths a bundled script may name: interpreters and the null/standard devices.
_SYSTEM_PREFIXES = ("/bin", "/usr/bin", "/usr/local/bin", "/dev/fd")
_SYSTEM_FILES = frozenset({"/dev/null", "/dev/stdin", "/dev/stdout", "/dev/stderr"})
# "/name..." not preceded by a name character, ':' or '/' (URLs), '.' or '~' (relative, home).
_ABSOLUTE = re.compile(r"(?<![A-Za-z0-9_.:/~$}@%+-])/[A-Za-z0-9_.@%+-][A-Za-z0-9_.@%+/-]*")
_HOME_REFERENCE = re.compile(r"(?<![A-Za-z0-9_])(~|\$HOME\b|\$\{HOME\})(/|(?![A-Za-z0-9_]))")
_PATH_RUN = re.compile(r"[A-Za-z0-9_.@%+/~-]+")


def invisible_characters(text: str) -> Iterator[Hit]:
    """Zero-width, bidi-override and tag characters (a leading byte-order mark is fine)."""
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        found = _INVISIBLE.findall(line)
        if found:
            names = sorted({f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in found})
            yield (
                number,
                "hidden-unicode",
                f"{len(found)} invisible or text-reordering character(s) ({', '.join(names)}): "
                "they hide text from a human reader while the model still reads it",
            )


def html_comments(text: str) -> Iterator[Hit]:
    """HTML comments with content: invisible when rendered, read by the model."""
    for match in _HTML_COMMENT.finditer(text):
        content = " ".join(match.group(1).split())
        if content:
            number = text.count("\n", 0, match.start()) + 1
            yield (
                number,
                "html-comment",
                f"HTML comment carrying text ({_clip(content)}): hidden when rendered; put "
                "instructions in visible text",
            )


def hidden_instructions(text: str) -> Iterator[Hit]:
    """Prompt-injection phrasing: override the agent's instructions or deceive the user."""
    for number, line in enumerate(text.split("\n"), start=1):
        for pattern, why in _INSTRUCTION_PATTERNS:
            match = pattern.search(line)
            if match:
                yield (
                    number,
                    "hidden-instruction",
                    f"{_clip(match.group(0))} {why}",
                )
                break


def encoded_blobs(text: str) -> Iterator[Hit]:
    """Long base64/hex runs: a payload nobody can review, decoded at run time."""
    for number, line in enumerate(text.split("\n"), start=1):
        match = _BASE64_BLOB.search(line)
        if match:
            yield (
                number,
                "encoded-blob",
                f"{len(match.group(0))}-character encoded blob: ship reviewable source instead",
            )


def credential_references(text: str, credentials: CredentialMatcher) -> Iterator[Hit]:
    """Mentions of credential locations (``~/.ssh``, ``/var/run/secrets``, ...)."""
    for number, line in enumerate(text.split("\n"), start=1):
        match = credentials.text_match(line)
        if match is not None:
            yield (
                number,
                "credential-path",
                f"refers to {match}, a credential location: a skill has no business there",
            )


def outside_references(text: str, file_dir: str, skill_root: str) -> Iterator[Hit]:
    """Paths a script names outside its skill: absolute paths, the home dir, ``..`` escapes."""
    for number, line in enumerate(text.split("\n"), start=1):
        if number == 1 and line.startswith("#!"):
            continue  # the interpreter line
        reasons: list[str] = []
        for match in _ABSOLUTE.finditer(line):
            path = normalize(match.group(0))
            if path in _SYSTEM_FILES or any(is_within(path, p) for p in _SYSTEM_PREFIXES):
                continue
            reasons.append(f"absolute path {match.group(0)}")
        if _HOME_REFERENCE.search(line):
            reasons.append("the home directory")
        for token in _PATH_RUN.findall(line):
            if token.startswith(("/", "~")) or ".." not in token.split("/"):
                continue
            resolved = normalize(os.path.join(file_dir, token))
            if not is_within(resolved, skill_root):
                reasons.append(f"{token} (escapes the skill directory)")
        if reasons:
            yield (
                number,
                "outside-path",
                f"refers to {', '.join(dict.fromkeys(reasons))}: bundled scripts may only use "
                "files inside the skill directory",
            )


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
