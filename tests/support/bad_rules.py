"""Rule files with one mistake each, and the message each must produce (site.yaml:LINE).

Shared by the loader's unit tests and the running router's hot-reload test.
"""

from __future__ import annotations

GOOD_HEAD = """\
version: 1
destinations:
  pacs: {url: "https://pacs.example/dicomweb"}
"""

BAD_RULE_FILES: list[tuple[str, str, str]] = [
    ("yaml syntax", "rules: [\n  - name: a\n", "site.yaml:2: not valid YAML"),
    ("empty file", "", "site.yaml:1: the rule file is empty"),
    (
        "unknown destination",
        GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs2]\ndefault: {hold: x}\n",
        "site.yaml:6: unknown destination 'pacs2' in rule 'a' (expected one of: pacs)",
    ),
    (
        "bad regex",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {modality: {regex: '(CT'}}\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:6: invalid regular expression /(CT/",
    ),
    (
        "bad timezone",
        GOOD_HEAD + "rules:\n  - name: a\n    when:\n      time: {between: "
        "'18:00-07:00', timezone: Europe/Zurch}\n    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:7: unknown time zone 'Europe/Zurch'",
    ),
    (
        "bad window",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: '6pm-7am'}}\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:6: time window '6pm-7am' is not HH:MM-HH:MM",
    ),
    (
        "impossible time",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: "
        "'25:00-07:00'}}\n    route: [pacs]\ndefault: {hold: x}\n",
        "impossible time",
    ),
    (
        "bad day",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: '18:00-07:00',"
        " days: [mon, funday]}}\n    route: [pacs]\ndefault: {hold: x}\n",
        "unknown day(s)",
    ),
    (
        "unknown attribute",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {modalty: CT}\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:6: unknown attribute 'modalty'",
    ),
    (
        "typo in rule key",
        GOOD_HEAD + "rules:\n  - name: a\n    wen: {modality: CT}\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:6: unknown key 'wen' in a rule",
    ),
    (
        "duplicate rule names",
        GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n"
        "    continue: true\n  - name: a\n    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:8: rule name 'a' already used on line 5",
    ),
    (
        "no route",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {modality: CT}\ndefault: {hold: x}\n",
        "site.yaml:5: rule 'a' routes nowhere",
    ),
    ("no default", GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n", "no 'default'"),
    (
        "destination without url",
        "version: 1\ndestinations:\n  pacs: {auth: X}\nrules:\n"
        "  - name: a\n    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:3: destination 'pacs' needs a url",
    ),
    (
        "bad wait",
        GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n"
        "    wait_for_study_complete: {quiet_seconds: -5}\ndefault: {hold: x}\n",
        "quiet_seconds must be a whole number",
    ),
    (
        "bad lane",
        GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n    lane: urgent\n"
        "default: {hold: x}\n",
        "site.yaml:7: lane must be routine or stat",
    ),
    (
        "bad tag",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {'(0008,10G0)': X}\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "unknown attribute '(0008,10G0)'",
    ),
    (
        "empty any",
        GOOD_HEAD + "rules:\n  - name: a\n    when: {any: []}\n    route: [pacs]\n"
        "default: {hold: x}\n",
        "'any' needs at least one condition",
    ),
    (
        "bad destination priority",
        "version: 1\ndestinations:\n  pacs: {url: 'https://p.example', priority: urgent}\n"
        "rules:\n  - name: a\n    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:3: priority must be routine or stat",
    ),
    (
        "not a transfer syntax",
        "version: 1\ndestinations:\n  pacs:\n    url: 'https://p.example'\n"
        "    transfer_syntaxes: [jpeg-ls]\nrules:\n  - name: a\n    route: [pacs]\n"
        "default: {hold: x}\n",
        "site.yaml:5: 'jpeg-ls' is not a transfer syntax UID",
    ),
    (
        "secret written into the rule file",
        "version: 1\ndestinations:\n  pacs:\n    url: 'https://p.example'\n"
        "    auth: {type: basic, username: u, password: hunter2}\nrules:\n  - name: a\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:5: auth of destination 'pacs': secrets never go in the rule file; use "
        "password_env",
    ),
    (
        "basic credentials over plain http",
        "version: 1\ndestinations:\n  pacs:\n    url: 'http://pacs.example/dicom-web'\n"
        "    auth: {type: basic, username: u, password_env: P}\nrules:\n  - name: a\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:4: destination 'pacs' sends basic credentials over plain http:// (use https://)",
    ),
    (
        "oauth2 client secret to a plain http token url",
        "version: 1\ndestinations:\n  pacs:\n    url: 'https://p.example'\n"
        "    auth:\n      type: oauth2\n      token_url: http://login.example/token\n"
        "      client_id: radflow\n      client_secret_env: S\nrules:\n  - name: a\n"
        "    route: [pacs]\ndefault: {hold: x}\n",
        "site.yaml:7: auth of destination 'pacs': token_url sends the client secret over "
        "plain http:// (use https://)",
    ),
    (
        "dimse tls with an unknown key",
        GOOD_HEAD + "  pacs2:\n    kind: dimse\n    host: pacs.local\n    port: 2762\n"
        "    ae_title: PACS\n    tls: {ca_file: /ca.pem, verify: false}\n"
        "default: {route: [pacs]}\n",
        "site.yaml:9: unknown key 'verify' in tls of destination 'pacs2'",
    ),
    (
        "unknown auth type",
        "version: 1\ndestinations:\n  pacs:\n    url: 'https://p.example'\n"
        "    auth: {type: kerberos}\nrules:\n  - name: a\n    route: [pacs]\n"
        "default: {hold: x}\n",
        "site.yaml:5: auth of destination 'pacs' needs type: basic, bearer or oauth2",
    ),
    (
        "client certificate without its key",
        "version: 1\ndestinations:\n  pacs:\n    url: 'https://p.example'\n"
        "    tls: {cert_file: /c.pem}\nrules:\n  - name: a\n    route: [pacs]\n"
        "default: {hold: x}\n",
        "site.yaml:5: tls of destination 'pacs': cert_file and key_file go together",
    ),
    (
        "unknown destination kind",
        GOOD_HEAD + "  pacs2: {kind: dimse2, host: pacs.local}\ndefault: {route: [pacs]}\n",
        "site.yaml:4: destination 'pacs2' has kind 'dimse2' (expected one of: stow-rs, "
        "dimse, report-return)",
    ),
    (
        "dimse destination without port and AE title",
        GOOD_HEAD + "  pacs2: {kind: dimse, host: pacs.local}\ndefault: {route: [pacs]}\n",
        "site.yaml:4: destination 'pacs2' (dimse) needs port, ae_title",
    ),
    (
        "dimse destination with a 17-character AE title",
        GOOD_HEAD + "  pacs2: {kind: dimse, host: pacs.local, port: 104, "
        "ae_title: ABCDEFGHIJKLMNOPQ}\ndefault: {route: [pacs]}\n",
        "site.yaml:4: destination 'pacs2': ae_title 'ABCDEFGHIJKLMNOPQ' is not an AE title",
    ),
    (
        "dimse destination with a port out of range",
        GOOD_HEAD + "  pacs2:\n    kind: dimse\n    host: pacs.local\n    port: 70000\n"
        "    ae_title: PACS\ndefault: {route: [pacs]}\n",
        "site.yaml:7: destination 'pacs2': port must be a number from 1 to 65535",
    ),
    (
        "dimse destination with http auth",
        GOOD_HEAD + "  pacs2:\n    kind: dimse\n    host: pacs.local\n    port: 104\n"
        "    ae_title: PACS\n    auth: {type: basic}\ndefault: {route: [pacs]}\n",
        "site.yaml:9: unknown key 'auth' in destination 'pacs2' (dimse)",
    ),
    (
        "report-return destination without a site",
        GOOD_HEAD + "  ris: {kind: report-return}\ndefault: {route: [pacs]}\n",
        "site.yaml:4: destination 'ris' needs site: the RIS site report-return sends to",
    ),
]
"""(kind of mistake, file text, expected message)."""
