"""DICOM TLS settings: the certificate → AE title map and the listener switches fail at
start with the variable's name, never on the first association."""

from __future__ import annotations

import pytest

from ingest.settings import IngestSettings
from radflow_core.errors import ConfigurationError


def test_certificate_peers_map_each_common_name_to_its_calling_ae_titles() -> None:
    settings = IngestSettings.from_env(
        {"RADFLOW_INGEST_DIMSE_TLS_PEERS": "STORESCU=STORESCU|CT1, site-b.example=*"}
    )
    peers = settings.certificate_peers
    assert peers["STORESCU"].allows("CT1") and not peers["STORESCU"].allows("MR2")
    assert peers["site-b.example"].allows("ANY_AE")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RADFLOW_INGEST_DIMSE_TLS_PEERS": "STORESCU"}, "RADFLOW_INGEST_DIMSE_TLS_PEERS"),
        ({"RADFLOW_INGEST_DIMSE_TLS_PEERS": "A=" + "X" * 17}, "RADFLOW_INGEST_DIMSE_TLS_PEERS"),
        ({"RADFLOW_INGEST_DIMSE_PLAIN": "false"}, "RADFLOW_INGEST_TLS_CERT_FILE"),
        ({"RADFLOW_INGEST_TLS_CERT_FILE": "/c.pem"}, "RADFLOW_INGEST_TLS_KEY_FILE"),
        ({"RADFLOW_INGEST_MAX_ASSOCIATIONS_PER_SENDER": "0"}, "PER_SENDER"),
    ],
)
def test_unusable_dicom_tls_settings_stop_the_service_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        IngestSettings.from_env(environ)
