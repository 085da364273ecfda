"""Skill vetting: a skill is checked completely before an agent may load it.

A skill is a directory with ``SKILL.md`` (YAML front-matter: ``name``, ``description``,
``allowed-tools``, ...) and any bundled files. Skills add attack surface that a quick human
review misses, so ``vet_skill`` refuses, with a finding per problem:

- hidden instructions: invisible Unicode (zero-width, bidi overrides, tag characters), HTML
  comments carrying text, prompt-injection phrasing ("ignore previous instructions", "do not
  tell the user") in the front-matter or any file, long encoded blobs;
- blanket grants: ``allowed-tools: Bash`` / ``Bash(*)`` unless the template opted in with
  ``allowAnyCommand``; scoped grants (``Bash(git:*)``) must stay within ``allowedCommands``;
- reach: bundled scripts naming paths outside the skill directory (absolute paths, the home
  directory, ``..`` escapes), any file naming a credential location, symlinks leading out,
  executables that cannot be reviewed.

Loading never widens the policy: what a skill declares is checked against the template's
policy, and the runtime keeps enforcing the policy alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kleave.sandbox import skill_scan
from kleave.sandbox.credentials import is_within
from kleave.sandbox.policy import LAUNCHERS, SHELLS, PolicyGuard

SKILL_FILE = "SKILL.md"
MAX_FILES = 500
MAX_TOTAL_BYTES = 10 * 1024 * 1024
MAX_DESCRIPTION = 1024
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_MARKDOWN = frozenset({".md", ".markdown", ".mdx"})
_EXECUTABLE_MAGIC = (
    b"\x7fELF",
    b"MZ",
    b"\xcf\xfa\xed\xfe",
    b"\xfe\xed\xfa\xcf",
    b"\xca\xfe\xba\xbe",
)

# Claude-style tool names in `allowed-tools`, by the runtime tool they would use.
_TOOL_NEEDS: dict[str, tuple[str, ...]] = {
    "Read": ("readFile",),
    "Write": ("writeFile",),
    "Edit": ("writeFile",),
    "MultiEdit": ("writeFile",),
    "NotebookEdit": ("writeFile",),
    "Glob": ("listFiles",),
    "LS": ("listFiles",),
    "Grep": ("listFiles", "readFile"),
}
_AGENT_SIDE_TOOLS = frozenset({"Task", "TodoWrite", "TodoRead", "NotebookRead", "Skill"})

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class SkillFinding:
    """One problem: what (code), where (file relative to the skill, 1-based line), and why."""

    code: str
    file: str
    line: int | None
    message: str
    severity: Severity = "error"

    def to_dict(self) -> dict[str, Any]:
        """The finding as the API and the audit log carry it."""
        return {
            "code": self.code,
            "file": self.file,
            "line": self.line,
            "message": self.message,
            "severity": self.severity,
        }

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.code}] {self.message}"


@dataclass
class SkillReport:
    """Everything vetting found; the skill loads only when no finding is an error."""

    path: Path
    name: str | None = None
    description: str | None = None
    allowed_tools: list[str] = field(default_factory=list)
    files: int = 0
    digest: str = ""
    """SHA-256 over the sorted (path, content hash) pairs: which exact files were vetted."""
    findings: list[SkillFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the skill may load."""
        return not any(f.severity == "error" for f in self.findings)

    def add(self, code: str, file: str, line: int | None, message: str, **kw: Any) -> None:
        """Record one finding (duplicates of the same code on the same line are dropped)."""
        finding = SkillFinding(code, file, line, message, **kw)
        if not any((f.code, f.file, f.line) == (code, file, line) for f in self.findings):
            self.findings.append(finding)

    def summary(self) -> str:
        """One line per error, for a refusal message."""
        errors = [str(f) for f in self.findings if f.severity == "error"]
        return "; ".join(errors) if errors else "no problems found"

    def to_dict(self) -> dict[str, Any]:
        """The report as ``POST /v1/skills`` returns it."""
        return {
            "path": str(self.path),
            "name": self.name,
            "description": self.description,
            "allowedTools": self.allowed_tools,
            "files": self.files,
            "digest": self.digest,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
        }


def vet_skill(root: Path, guard: PolicyGuard) -> SkillReport:
    """Check the skill directory ``root`` against the guard's policy; never runs anything."""
    root = Path(os.path.realpath(root))
    report = SkillReport(path=root)
    skill_md = root / SKILL_FILE
    if not skill_md.is_file() or skill_md.is_symlink():
        report.add("missing-skill-md", SKILL_FILE, None, f"{root} has no regular {SKILL_FILE}")
        return report
    hashes: list[tuple[str, str]] = []
    for relative, text in _walk(root, report, hashes):
        _scan_file(root, relative, text, guard, report)
        if relative == SKILL_FILE:
            _check_front_matter(text, guard, report)
    report.files = len(hashes)
    report.digest = hashlib.sha256(
        "".join(f"{path}\0{digest}\n" for path, digest in sorted(hashes)).encode()
    ).hexdigest()
    return report


def _walk(
    root: Path, report: SkillReport, hashes: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every text file; links, binaries and size limits as findings."""
    total = 0

    def unreadable(error: OSError) -> None:
        relative = os.path.relpath(str(error.filename), root)
        report.add("unreadable", relative, None, f"cannot be read for vetting: {error.strerror}")

    for directory, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                target = os.path.realpath(full)
                if not is_within(target, str(root)):
                    report.add(
                        "symlink-escape",
                        relative,
                        None,
                        f"symlink to {os.readlink(full)} leads outside the skill directory "
                        f"(to {target})",
                    )
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            total += info.st_size
            if len(hashes) >= MAX_FILES or total > MAX_TOTAL_BYTES:
                report.add(
                    "too-large",
                    relative,
                    None,
                    f"the skill exceeds {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes, too much "
                    "to vet",
                )
                return
            data = Path(full).read_bytes()
            hashes.append((relative, hashlib.sha256(data).hexdigest()))
            text = _as_text(data)
            if text is None:
                executable = data.startswith(_EXECUTABLE_MAGIC) or info.st_mode & 0o111
                report.add(
                    "binary-file",
                    relative,
                    None,
                    "binary executable: its behaviour cannot be reviewed"
                    if executable
                    else "binary file: not vetted (fine for images and data)",
                    severity="error" if executable else "warning",
                )
                continue
            yield relative, text


def _as_text(data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _scan_file(
    root: Path, relative: str, text: str, guard: PolicyGuard, report: SkillReport
) -> None:
    hits = [
        *skill_scan.invisible_characters(text),
        *skill_scan.hidden_instructions(text),
        *skill_scan.encoded_blobs(text),
        *skill_scan.credential_references(text, guard.credentials),
    ]
    if Path(relative).suffix.lower() in _MARKDOWN:
        hits += skill_scan.html_comments(text)
    else:
        file_dir = os.path.dirname(os.path.join(root, relative))
        hits += skill_scan.outside_references(text, file_dir, str(root))
    for line, code, message in hits:
        report.add(code, relative, line, message)


def _front_matter(text: str) -> tuple[str, int] | None:
    """The YAML between the leading ``---`` lines, and the line number it starts on."""
    lines = text.removeprefix("\ufeff").split("\n")
    if not lines or lines[0].strip() != "---":
        return None
    for index in range(1, len(lines)):
        if lines[index].strip() in ("---", "..."):
            return "\n".join(lines[1:index]), 2
    return None


def _check_front_matter(text: str, guard: PolicyGuard, report: SkillReport) -> None:
    found = _front_matter(text)
    if found is None:
        report.add(
            "bad-frontmatter", SKILL_FILE, 1, "SKILL.md must start with YAML front-matter (---)"
        )
        return
    source, first_line = found
    try:
        meta = yaml.safe_load(source)
    except yaml.YAMLError as error:
        report.add("bad-frontmatter", SKILL_FILE, first_line, f"front-matter is not YAML: {error}")
        return
    if not isinstance(meta, dict):
        report.add("bad-frontmatter", SKILL_FILE, first_line, "front-matter must be a mapping")
        return
    key_lines = {
        line.split(":", 1)[0].strip(): first_line + index
        for index, line in enumerate(source.split("\n"))
        if ":" in line and not line[:1].isspace()
    }
    _check_identity(meta, key_lines, report)
    # Decoded values: YAML escapes ("\u200b", "\x20") hide from the line scan of the raw text.
    for key, value in meta.items():
        for decoded in _strings(value):
            for _, code, message in [
                *skill_scan.invisible_characters(decoded),
                *skill_scan.hidden_instructions(decoded),
            ]:
                report.add(code, SKILL_FILE, key_lines.get(str(key)), f"in {key}: {message}")
    _check_grants(meta.get("allowed-tools"), key_lines.get("allowed-tools"), guard, report)


def _check_identity(meta: dict[Any, Any], key_lines: dict[str, int], report: SkillReport) -> None:
    name, description = meta.get("name"), meta.get("description")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 64:
        report.add(
            "bad-frontmatter",
            SKILL_FILE,
            key_lines.get("name"),
            f"name {name!r} must be 1-64 lowercase letters, digits and single hyphens",
        )
    else:
        report.name = name
    if not isinstance(description, str) or not description.strip():
        report.add("bad-frontmatter", SKILL_FILE, key_lines.get("description"), "no description")
    elif len(description) > MAX_DESCRIPTION:
        report.add(
            "bad-frontmatter",
            SKILL_FILE,
            key_lines.get("description"),
            f"description is {len(description)} characters (at most {MAX_DESCRIPTION}): "
            "metadata is loaded into every prompt, a long one can carry instructions",
        )
    else:
        report.description = description


def _check_grants(raw: Any, line: int | None, guard: PolicyGuard, report: SkillReport) -> None:
    """``allowed-tools`` must not exceed the template's policy."""
    if raw is None:
        return
    if isinstance(raw, str):
        grants = split_grants(raw)
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        grants = [g for item in raw for g in split_grants(item)]
    else:
        report.add("bad-frontmatter", SKILL_FILE, line, "allowed-tools must be a string or list")
        return
    report.allowed_tools = grants
    policy = guard.policy
    for grant in grants:
        tool, _, scope = grant.partition("(")
        scope = scope.removesuffix(")").strip()
        if tool == "Bash":
            command = _granted_command(scope)
            if command is None:
                if policy.allow_any_command:
                    report.add(
                        "blanket-grant",
                        SKILL_FILE,
                        line,
                        f"{grant} grants any command; allowed because the template sets "
                        "tools.allowAnyCommand",
                        severity="warning",
                    )
                else:
                    report.add(
                        "blanket-grant",
                        SKILL_FILE,
                        line,
                        f"{grant} grants arbitrary shell execution: one approval would become "
                        "silent execution of anything; it needs the template's explicit "
                        "tools.allowAnyCommand: true (or scope it, e.g. Bash(git status:*))",
                    )
            elif not policy.allow_any_command and command not in policy.allowed_commands:
                report.add(
                    "grant-exceeds-policy",
                    SKILL_FILE,
                    line,
                    f"{grant} needs the command {command!r}, which the template's "
                    f"tools.allowedCommands ({', '.join(policy.allowed_commands) or 'none'}) "
                    "does not allow",
                )
            elif "exec" not in policy.allowed_tools:
                report.add("grant-exceeds-policy", SKILL_FILE, line, f"{grant} needs the exec tool")
        elif tool in _TOOL_NEEDS:
            missing = [t for t in _TOOL_NEEDS[tool] if t not in policy.allowed_tools]
            if missing:
                report.add(
                    "grant-exceeds-policy",
                    SKILL_FILE,
                    line,
                    f"{grant} needs the {', '.join(missing)} tool(s), not in the template's "
                    "tools.allowedTools",
                )
        elif tool not in _AGENT_SIDE_TOOLS:
            report.add(
                "unknown-tool",
                SKILL_FILE,
                line,
                f"{grant} is not a tool this runtime provides; it grants nothing here "
                "(network access is governed by the template's egress allow-list)",
                severity="warning",
            )


def split_grants(raw: str) -> list[str]:
    """Split an ``allowed-tools`` string on commas/whitespace outside parentheses."""
    grants: list[str] = []
    current: list[str] = []
    depth = 0
    for char in raw:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                grants.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        grants.append("".join(current))
    return grants


def _granted_command(scope: str) -> str | None:
    """The single command a ``Bash(...)`` scope names, or None when it grants any command."""
    words = scope.replace(":*", " ").split()
    if not words:
        return None
    command = os.path.basename(words[0])
    if any(c in command for c in "*?[{$`|;&") or command in SHELLS or command in LAUNCHERS:
        return None
    return command


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


REGISTRY_FILE = "skills.json"


def record_skill(registry_dir: Path, report: SkillReport, loaded_at: str) -> dict[str, Any]:
    """Add a vetted skill to the registry of loaded skills (atomically); its record."""
    if not report.ok or report.name is None:
        raise ValueError("only a skill that passed vetting can be recorded")
    record = {
        "name": report.name,
        "description": report.description,
        "path": str(report.path),
        "allowedTools": report.allowed_tools,
        "files": report.files,
        "digest": report.digest,
        "loadedAt": loaded_at,
        "warnings": [f.to_dict() for f in report.findings],
    }
    skills = {s["name"]: s for s in loaded_skills(registry_dir)}
    skills[report.name] = record
    registry_dir.mkdir(parents=True, exist_ok=True)
    temporary = registry_dir / f".{REGISTRY_FILE}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(sorted(skills.values(), key=lambda s: str(s["name"])), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, registry_dir / REGISTRY_FILE)
    return record


def loaded_skills(registry_dir: Path) -> list[dict[str, Any]]:
    """The loaded skills' records, by name."""
    try:
        data = json.loads((registry_dir / REGISTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [s for s in data if isinstance(s, dict)] if isinstance(data, list) else []
