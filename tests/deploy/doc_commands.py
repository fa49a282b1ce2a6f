"""The shell commands a Markdown document tells its reader to run, split into simple
commands with their flags, so that a test can hold each name, path, namespace and port
in them against the manifests. Reads ```sh blocks and inline code spans that start with
a command; heredoc bodies are skipped."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
COMMENT = re.compile(r"(^|\s)#.*$")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
PLACEHOLDER = re.compile(r"<([A-Za-z][^<>]*)>")
OPERATORS = {"|", "||", "&", "&&", ";", "(", ")", ";;", "<", ">", ">>"}
PROGRAMS = ("kubectl", "helm", "make", "kind", "docker", "mc", "curl", "storescu", "echoscu")
VALUED_FLAGS = {
    "kubectl": {
        "-n",
        "--namespace",
        "-k",
        "--kustomize",
        "-f",
        "--filename",
        "-l",
        "--selector",
        "-o",
        "--output",
        "--for",
        "--timeout",
        "--from-literal",
        "--from-file",
        "--cert",
        "--key",
        "--type",
        "-c",
        "--container",
    },
    "helm": {"-n", "--namespace", "--version", "--set", "--set-string", "-f", "--values"},
}
"""Flags that take the next word as their value when not written ``--flag=value``."""


@dataclass
class Command:
    """One simple command: its program, positional words and flags (in order)."""

    program: str
    args: list[str] = field(default_factory=list)
    flags: list[tuple[str, str | None]] = field(default_factory=list)
    text: str = ""

    def values(self, *names: str) -> list[str]:
        return [v for f, v in self.flags if f in names and v is not None]

    @property
    def namespace(self) -> str | None:
        found = self.values("-n", "--namespace")
        return found[-1] if found else None


def _shell_lines(markdown: str) -> list[str]:
    """Command lines: fenced sh blocks (continuations joined, comments and heredoc
    bodies dropped) and inline code spans that begin with a known program."""
    lines: list[str] = []
    for language, body in FENCE.findall(markdown):
        if language not in ("sh", "bash", "shell"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        until: str | None = None
        for line in joined.splitlines():
            if until is not None:
                if line.strip() == until:
                    until = None
                continue
            heredoc = HEREDOC.search(line)
            if heredoc:
                until = heredoc.group(1)
            line = COMMENT.sub("", line).strip()
            if line:
                lines.append(line)
    prose = FENCE.sub("", markdown).replace("\n", " ")
    for span in INLINE.findall(prose):
        span = span.strip()
        if span.split(" ", 1)[0] in PROGRAMS:
            lines.append(span)
    return lines


def _split(line: str) -> list[list[str]]:
    # <placeholders> become one word the checks skip, not shell redirections.
    line = PLACEHOLDER.sub(lambda m: "«" + m.group(1).replace(" ", "_") + "»", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    simple: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            simple.append([])
        else:
            simple[-1].append(token)
    return [words for words in simple if words]


def _parse(words: list[str], text: str) -> Command | None:
    # `for s in a b; do kubectl ...` and `do`/`then` prefixes: the command follows them.
    while words and words[0] in ("do", "then", "else", "time"):
        words = words[1:]
    if not words or words[0] not in PROGRAMS:
        return None
    program, rest = words[0], words[1:]
    valued = VALUED_FLAGS.get(program, set())
    command = Command(program=program, text=text)
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":  # what follows is the command run inside (kubectl exec)
            break
        if word.startswith("-") and len(word) > 1:
            if "=" in word and word.startswith("--"):
                name, value = word.split("=", 1)
                command.flags.append((name, value))
            elif word in valued and i + 1 < len(rest):
                command.flags.append((word, rest[i + 1]))
                i += 1
            else:
                command.flags.append((word, None))
        else:
            command.args.append(word)
        i += 1
    return command


def commands(path: Path) -> list[Command]:
    """Every kubectl, helm, make, … command the document shows, in order."""
    found = []
    for line in _shell_lines(path.read_text()):
        for words in _split(line):
            command = _parse(words, line)
            if command is not None:
                found.append(command)
    return found


def for_loop_items(path: Path) -> list[list[str]]:
    """The word lists of ``for VAR in WORDS; do`` loops in the document's sh blocks."""
    loops = []
    for line in _shell_lines(path.read_text()):
        match = re.match(r"for \w+ in (.+?);\s*do\b", line)
        if match:
            loops.append(match.group(1).split())
    return loops


def is_literal(word: str) -> bool:
    """A word the reader types as is: no placeholder (<...>) and no shell expansion."""
    return "..." not in word and not any(c in word for c in "«»<>$*{}")
