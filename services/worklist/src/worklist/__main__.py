"""``python -m worklist`` runs the worklist service; ``python -m worklist check SITES``
validates a sites file."""

from __future__ import annotations

import sys
from pathlib import Path

from radflow_core.runtime import run_main
from worklist.service import WorklistService
from worklist.settings import WorklistConfig
from worklist.sites import SitesFileError, load_sites


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        return check(args[1:])
    return run_main(
        name="worklist",
        description=(
            "radflow worklist: receives HL7 orders (ORM^O01, OMI^O23) over MLLP from each "
            "site's RIS, acknowledges AA once each scheduled procedure step is on the "
            "compacted topic worklist.items (its order document in the blob store), and "
            "answers DICOM Modality Worklist C-FIND queries (AE RADFLOW_MWL) from the "
            "merged view, each modality seeing its own site's items (and those its site "
            "is federated with). Tool: 'python -m worklist check SITES'."
        ),
        sections=WorklistConfig.SECTIONS,
        load=WorklistConfig.from_env,
        build=WorklistService,
        argv=args,
        files=lambda config: load_sites(config.worklist.sites_file),
    )


def check(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m worklist check SITES", file=sys.stderr)
        return 2
    try:
        sites = load_sites(Path(argv[0]))
    except SitesFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    for site in sites.by_name.values():
        print(
            f"{site.name}: facility {site.sending_facility} modalities "
            f"{','.join(sorted(site.modalities)) or '-'} sees {','.join(sorted(site.visible))}"
        )
    print(f"{argv[0]}: {len(sites.by_name)} site(s): OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
