"""write_rules: a rule file for a test or a benchmark, written as YAML text.

Text, not a dumped mapping, so that a test can write a file that is wrong on purpose
and find the line its error names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def write_rules(
    path: Path,
    destinations: Mapping[str, str],
    route: Sequence[str] | None = None,
    *,
    rules: str | None = None,
    rule_keys: Mapping[str, str] | None = None,
    stat_calling_aes: Sequence[str] = (),
    timezone: str | None = None,
) -> Path:
    """Write a rule file to ``path`` (replacing it) and return ``path``.

    ``destinations`` maps each destination's name to its body: YAML block lines such as
    ``"url: http://...\\nmax_batch: 5"``. Then either

    - ``route``: one rule, ``everything``, sends every instance to these destinations,
      with ``rule_keys`` as more keys of that rule; ``stat_calling_aes`` puts those
      calling AE titles in the STAT lane; nothing else is held (``unrouted``); or
    - ``rules``: this YAML text follows the destinations as it is (rules, stat,
      default), for tests of the rules themselves.
    """
    lines = ["version: 1"]
    if timezone:
        lines.append(f"timezone: {timezone}")
    lines.append("destinations:")
    for name, body in destinations.items():
        lines += [f"  {name}:", *(f"    {line}" for line in body.strip().splitlines())]
    if rules is not None and route is None:
        text = "\n".join(lines) + "\n" + rules
    elif route is not None and rules is None:
        if stat_calling_aes:
            lines.append(f"stat: {{calling_aes: [{', '.join(stat_calling_aes)}]}}")
        lines += ["rules:", "  - name: everything", f"    route: [{', '.join(route)}]"]
        lines += [f"    {key}: {value}" for key, value in (rule_keys or {}).items()]
        lines.append("default: {hold: unrouted}")
        text = "\n".join(lines) + "\n"
    else:
        raise ValueError("write_rules takes either route or rules")
    path.write_text(text)
    return path


def dimse_destination(port: int, ae_title: str, **extra: str) -> str:
    """The body of a DIMSE destination on 127.0.0.1:``port``; ``extra`` adds keys
    (``max_batch="20"``)."""
    body = [f"kind: dimse\nhost: 127.0.0.1\nport: {port}\nae_title: {ae_title}"]
    return "\n".join([*body, *(f"{key}: {value}" for key, value in extra.items())])
