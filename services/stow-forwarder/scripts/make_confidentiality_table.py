"""Regenerate ``stow_forwarder/confidentiality_table.py`` from DICOM PS3.15 Table E.1-1.

The table is read from ``standard/confidentiality_profile_attributes.json`` of
innolitics/dicom-standard (MIT; the standard parsed into JSON, every column of the
table). Run: ``python make_confidentiality_table.py <json> <commit> <revision> > out.py``
and ``ruff format`` the result.
"""

from __future__ import annotations

import json
import sys

COLUMNS = ("rtnLongModifDatesOpt", "rtnPatCharsOpt", "rtnDevIdOpt", "rtnUIDsOpt", "cleanDescOpt")


def main(path: str, commit: str, revision: str) -> None:
    with open(path, encoding="utf-8") as file:
        rows = json.load(file)
    print(f'''"""DICOM PS3.15 Table E.1-1 (revision {revision}), generated: do not edit.

Source: innolitics/dicom-standard, standard/confidentiality_profile_attributes.json
at commit {commit}
(regenerate with scripts/make_confidentiality_table.py). One row per
attribute: (tag as 8 hex digits, x for a repeating group's digit; name; Basic Profile
action; then the action of each option this pipeline implements, "" where the option
does not change it: Retain Longitudinal Temporal Information with Modified Dates,
Retain Patient Characteristics, Retain Device Identity, Retain UIDs, Clean
Descriptors). Private attributes (odd groups) are not rows: every one is removed.
"""

from __future__ import annotations

ROWS: tuple[tuple[str, str, str, str, str, str, str, str], ...] = (''')
    for row in sorted(rows, key=lambda r: r["id"]):
        tag = row["tag"].strip("()").replace(",", "").lower()
        if tag.startswith("gggg"):  # "(gggg,eeee) where gggg is odd": by group parity
            continue
        cells = [tag, row["name"], row["basicProfile"], *(row.get(c, "") for c in COLUMNS)]
        print(f"    {tuple(cells)!r},")
    print(")")


if __name__ == "__main__":
    main(*sys.argv[1:4])
