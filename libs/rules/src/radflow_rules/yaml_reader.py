"""Reading a YAML configuration file so that every problem names its line.

The YAML is walked as a node tree (not loaded into dicts): each node knows where it
stands, so a reader collects every problem with its line before anything is used,
and the file's owner sees them all at once. :class:`YamlReader` holds the small typed
accessors; the rule file's reader and report-return's sites file reader build on it,
each raising its own subclass of :class:`YamlFileError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from radflow_core.errors import ConfigurationError
from radflow_rules.destinations import Tls


@dataclass(frozen=True)
class Problem:
    line: int
    """1-based line in the file."""
    message: str


class YamlFileError(ConfigurationError):
    """A configuration file that cannot be used; lists every problem found, with its line."""

    reason = "invalid_yaml_file"

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        """One ``file:line: message`` per problem, as editors and CI logs show them."""
        return [f"{self.source}:{p.line}: {p.message}" for p in self.problems]


E = TypeVar("E", bound=YamlFileError)


class YamlReader:
    """Typed accessors over YAML nodes that record problems instead of raising."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def fail(self, node: Node, message: str) -> None:
        self.problems.append(Problem(node.start_mark.line + 1, message))

    def warn(self, node: Node, message: str) -> None:
        self.warnings.append(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def mapping(self, node: Node, what: str) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping (key: value)")
            return None
        out: dict[str, Node] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in out:
                self.fail(key, f"duplicate key {name!r} in {what}")
            out[name] = value
        return out

    def sequence(self, node: Node, what: str) -> list[Node]:
        if isinstance(node, SequenceNode):
            return list(node.value)
        if isinstance(node, ScalarNode):
            return [node]
        self.fail(node, f"{what} must be a list")
        return []

    def scalar(self, node: Node, what: str) -> str | None:
        if not isinstance(node, ScalarNode):
            self.fail(node, f"{what} must be a single value")
            return None
        return str(node.value)

    def boolean(self, node: Node, what: str) -> bool:
        text = (self.scalar(node, what) or "").lower()
        if text not in ("true", "false"):
            self.fail(node, f"{what} must be true or false")
        return text == "true"

    def unknown_keys(self, items: dict[str, Node], allowed: set[str], what: str) -> None:
        for key, value in items.items():
            if key not in allowed:
                self.fail(
                    value,
                    f"unknown key {key!r} in {what} (expected one of: "
                    f"{', '.join(sorted(allowed))})",
                )

    def tls(self, node: Node, what: str, *, server_name: bool = False) -> Tls | None:
        """A ``tls:`` mapping (CA, client certificate and key files, and with
        ``server_name`` the name to check the peer's certificate for); ``what`` names it."""
        fields = self.mapping(node, what)
        if fields is None:
            return None
        files = {"ca_file", "cert_file", "key_file"}
        self.unknown_keys(fields, files | ({"server_name"} if server_name else set()), what)
        paths = {k: Path(self.scalar(v, k) or "") for k, v in fields.items() if k in files}
        if ("cert_file" in paths) != ("key_file" in paths):
            self.fail(node, f"{what}: cert_file and key_file go together")
        name = (
            self.scalar(fields["server_name"], "server_name") if "server_name" in fields else None
        )
        return Tls(
            paths.get("ca_file"), paths.get("cert_file"), paths.get("key_file"), name or None
        )


def compose(text: str, source: str, error: type[E], what: str) -> Node:
    """The node tree of a file's text; ``what`` names the file in its problem.

    Raises:
        E: the text is not YAML (with the line of the syntax error), or is empty.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or "unreadable"
        raise error(source, [Problem(line, f"not valid YAML: {problem}")]) from None
    if root is None:
        raise error(source, [Problem(1, f"{what} is empty")])
    return root


def read_text(path: Path, error: type[E]) -> str:
    """A file's text.

    Raises:
        E: it cannot be read as UTF-8 (the error type, as its one problem).
    """
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(str(path), [Problem(1, f"cannot read: {type(exc).__name__}")]) from None
