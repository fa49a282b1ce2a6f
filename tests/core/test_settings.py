"""Settings come from RADFLOW_* variables, and a bad value names its variable."""

from __future__ import annotations

import pytest
from pynetdicom import AE

from ingest.settings import IngestConfig, IngestSettings, PeerRule
from radflow_core.errors import ConfigurationError
from radflow_core.settings import KafkaSettings, S3Settings


def test_defaults_are_the_local_stack() -> None:
    kafka = KafkaSettings.from_env({})
    s3 = S3Settings.from_env({})
    ingest = IngestSettings.from_env({})
    assert kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s3.endpoint == "http://127.0.0.1:9000" and s3.bucket == "radflow"
    assert (ingest.ae_title, ingest.dimse_port, ingest.http_port) == ("RADFLOW", 11112, 8080)


def test_a_stalled_store_is_answered_before_a_pynetdicom_sender_gives_up() -> None:
    """0xA700 at the store timeout, not an association the sender aborts after its
    DIMSE timeout (pynetdicom's default, 30 s), for a CT slice; the largest instance
    accepted still gets minutes for its hashing and upload."""
    ingest = IngestSettings.from_env({})
    assert ingest.store_timeout_for(512 * 1024) < AE().dimse_timeout == 30
    assert ingest.store_timeout_for(ingest.max_instance_bytes) > 120


def test_values_are_read_and_typed() -> None:
    ingest = IngestSettings.from_env(
        {
            "RADFLOW_INGEST_DIMSE_PORT": "104",
            "RADFLOW_INGEST_ALLOWED_PEERS": "CT1, MR2@10.0.0.0/8",
        }
    )
    assert ingest.dimse_port == 104
    assert ingest.allowed_peers == ("CT1", "MR2@10.0.0.0/8")


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"RADFLOW_INGEST_DIMSE_PORT": "eleven"}, "RADFLOW_INGEST_DIMSE_PORT"),
        ({"RADFLOW_INGEST_DIMSE_PORT": "70000"}, "RADFLOW_INGEST_DIMSE_PORT"),
        ({"RADFLOW_INGEST_AE_TITLE": "X" * 17}, "RADFLOW_INGEST_AE_TITLE"),
        ({"RADFLOW_INGEST_ALLOWED_PEERS": "CT1@not-an-ip"}, "RADFLOW_INGEST_ALLOWED_PEERS"),
        ({"RADFLOW_INGEST_EXTRA_SOP_CLASSES": "1.2.abc"}, "RADFLOW_INGEST_EXTRA_SOP_CLASSES"),
        ({"RADFLOW_KAFKA_IDEMPOTENCE": "perhaps"}, "RADFLOW_KAFKA_IDEMPOTENCE"),
        ({"RADFLOW_S3_ENDPOINT": "127.0.0.1:9000"}, "RADFLOW_S3_ENDPOINT"),
    ],
)
def test_bad_value_fails_naming_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigurationError, match=names):
        IngestConfig.from_env(env)


def test_a_bad_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as info:
        KafkaSettings.from_env(
            {"RADFLOW_KAFKA_SASL_PASSWORD": "", "RADFLOW_KAFKA_ACK_TIMEOUT_S": "-1"}
        )
    assert "RADFLOW_KAFKA_ACK_TIMEOUT_S" in str(info.value)
    secret = "hunter2-secret"
    with pytest.raises(ConfigurationError) as info:
        S3Settings.from_env({"RADFLOW_S3_SECRET_KEY": secret, "RADFLOW_S3_BUCKET": "x"})
    assert secret not in str(info.value)


def test_help_lists_every_variable_with_its_documentation() -> None:
    described = {name: doc for name, _, doc in IngestSettings.describe()}
    assert set(described) == {IngestSettings.env_name(f) for f in IngestSettings.model_fields}
    assert all(described.values()), "every setting needs a docstring"
    secret_defaults = [d for n, d, _ in S3Settings.describe() if n == "RADFLOW_S3_SECRET_KEY"]
    assert secret_defaults == ["(set)"]


@pytest.mark.parametrize(
    ("rule", "ae", "address", "allowed"),
    [
        ("CT1", "CT1", "192.0.2.7", True),
        ("CT1", "MR1", "192.0.2.7", False),
        ("CT1@192.0.2.7", "CT1", "192.0.2.7", True),
        ("CT1@192.0.2.7", "CT1", "192.0.2.8", False),
        ("*@10.0.0.0/8", "ANY", "10.20.30.40", True),
        ("*@10.0.0.0/8", "ANY", "11.0.0.1", False),
        ("CT1@::1", "CT1", "::1", True),
    ],
)
def test_peer_rules_match_ae_title_and_network(
    rule: str, ae: str, address: str, allowed: bool
) -> None:
    assert PeerRule.parse(rule).allows(ae, address) is allowed
