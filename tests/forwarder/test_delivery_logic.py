"""The forwarder's pure logic: reading STOW-RS answers, what is retried, how batches
are cut, bounded concurrency, the circuit breaker, STAT precedence, OAuth2 token
caching, and its settings."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import UTC, datetime

import httpx
import pytest
from pydicom.uid import generate_uid

from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import ConfigurationError
from radflow_core.events import BlobRef, ForwardRequested, Lane, Protocol, Sender
from radflow_rules.destinations import Auth, AuthKind, DestinationKind, DimsePeer, SecretRef
from radflow_rules.loader import load_text
from radflow_rules.rules import Destination
from stow_forwarder.answer import Outgoing
from stow_forwarder.auth import ClientCredentials
from stow_forwarder.client import StowClient, classify
from stow_forwarder.delivery import bounded, chunks
from stow_forwarder.flow import Circuit, CircuitBreaker, StatFirst
from stow_forwarder.markers import State, decode, encode, merge, study_prefix
from stow_forwarder.settings import ForwarderSettings
from stow_forwarder.stow import MultipartBody, parse_response


def _response_body(stored: list[str], failed: dict[str, int]) -> bytes:
    body: dict[str, object] = {}
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in stored],
        }
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}}
                for u, r in failed.items()
            ],
        }
    return json.dumps(body).encode()


def _answer(status: int, body: bytes = b"") -> httpx.Response:
    return httpx.Response(status, content=body, headers={"Content-Type": "application/dicom+json"})


def test_each_instance_is_delivered_refused_or_retried_by_what_the_server_said() -> None:
    body = _response_body(["1.1", "1.2"], {"1.3": 0xC122, "1.4": 0xA700})
    answer = classify(_answer(202, body), ["1.1", "1.2", "1.3", "1.4", "1.5"])
    assert answer.delivered == {"1.1", "1.2"}
    assert answer.refused == {"1.3": (0xC122, "HTTP 202, FailureReason 0xC122")}
    assert set(answer.retry) == {"1.4", "1.5"}  # out of resources; not mentioned


def test_an_instance_the_server_already_holds_is_delivered() -> None:
    body = _response_body(["1.1"], {"1.2": StoreStatus.DUPLICATE_SOP_INSTANCE})
    answer = classify(_answer(409, body), ["1.1", "1.2"])
    assert answer.delivered == {"1.1", "1.2"}
    assert not answer.refused and not answer.retry


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_retried_honouring_retry_after(status: int) -> None:
    answer = classify(httpx.Response(status, headers={"Retry-After": "7"}), ["1.1"])
    assert set(answer.retry) == {"1.1"} and not answer.refused
    assert answer.retry_after_s == 7


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415])
def test_other_client_errors_are_final(status: int) -> None:
    answer = classify(_answer(status), ["1.1", "1.2"])
    assert set(answer.refused) == {"1.1", "1.2"} and not answer.retry
    assert answer.refused["1.1"] == (None, f"HTTP {status}")


def test_a_conflict_refuses_the_failed_instances_with_their_reasons() -> None:
    answer = classify(_answer(409, _response_body([], {"1.1": 0x0122})), ["1.1"])
    assert answer.refused == {"1.1": (0x0122, "HTTP 409, FailureReason 0x0122")}


def test_an_unreadable_200_is_sent_again_rather_than_assumed_delivered() -> None:
    answer = classify(_answer(200, b"<html>ok</html>"), ["1.1"])
    assert set(answer.retry) == {"1.1"} and not answer.delivered


def test_the_multipart_body_has_the_length_it_announces(tmp_path) -> None:
    files = []
    for i, size in enumerate((0, 10, 3 * 1024 * 1024 + 7)):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(bytes([i]) * size)
        files.append(path)
    body = MultipartBody.of(files)

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in body.stream()])

    data = asyncio.run(collect())
    assert len(data) == body.length()
    assert data.count(f"--{body.boundary}\r\n".encode()) == 3
    assert data.endswith(f"--{body.boundary}--\r\n".encode())
    assert 'type="application/dicom"' in body.content_type


def test_parse_response_reads_lists_and_ignores_an_empty_body() -> None:
    wrapped = b"[" + _response_body(["1.1"], {}) + b"]"
    assert parse_response(wrapped, "application/dicom+json")["1.1"].stored
    assert parse_response(b"", None) == {}


def _request(study: str, sop: str | None = None, size: int = 100) -> ForwardRequested:
    now = datetime.now(UTC)
    blob = BlobRef(bucket="b", key="k", size=size, sha256="a" * 64)
    return ForwardRequested(
        sop_instance_uid=sop or generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study,
        series_instance_uid=generate_uid(),
        sender=Sender(protocol=Protocol.DIMSE),
        received_at=now,
        destination="d",
        lane=Lane.ROUTINE,
        blob=blob,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        requested_transfer_syntax_uid="1.2.840.10008.1.2.1",
        original_sha256="a" * 64,
        rules=("r",),
        rules_digest="x",
        idempotency_key="b" * 64,
        routed_at=now,
    )


def test_batches_hold_one_study_within_count_and_size_and_no_repeated_uid() -> None:
    a, b = generate_uid(), generate_uid()
    same = generate_uid()
    requests = [
        *(_request(a) for _ in range(5)),
        _request(b, same),
        _request(b, same),  # same UID, other bytes: its own request
        _request(b, size=10_000),
    ]
    cut = [len(c) for c in chunks(requests, max_count=3, max_bytes=5_000)]
    assert cut == [3, 2, 1, 1, 1]


def test_interleaved_studies_are_grouped_per_study_keeping_each_studys_order() -> None:
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    requests = [_request(study) for _ in range(7) for study in (a, b, c)]
    cut = list(chunks(requests, max_count=5, max_bytes=1_000_000))
    assert [(c[0].study_instance_uid, len(c)) for c in cut] == [
        (a, 5),
        (a, 2),
        (b, 5),
        (b, 2),
        (c, 5),
        (c, 2),
    ]
    for study in (a, b, c):
        mine = [r for r in requests if r.study_instance_uid == study]
        assert [r for chunk in cut if chunk[0].study_instance_uid == study for r in chunk] == mine


def test_a_repeated_uid_of_a_study_waits_for_a_later_batch_of_that_study() -> None:
    a, b = generate_uid(), generate_uid()
    same = generate_uid()
    first, other, again = _request(a, same), _request(b), _request(a, same)
    cut = list(chunks([first, other, again], max_count=50, max_bytes=1_000_000))
    assert cut == [[first], [again], [other]]


def test_bounded_work_keeps_the_order_and_never_runs_more_than_the_limit() -> None:
    running = 0
    most = 0

    async def work(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01 * (item % 3))
        running -= 1
        return item * 2

    assert asyncio.run(bounded(list(range(20)), work, 4)) == [i * 2 for i in range(20)]
    assert most == 4


def test_bounded_work_finishes_every_item_before_raising_the_first_failure() -> None:
    finished: list[int] = []

    async def work(item: int) -> None:
        await asyncio.sleep(0.02 if item else 0)
        if item == 0:
            raise TimeoutError("the first one failed at once")
        finished.append(item)

    with pytest.raises(TimeoutError):
        asyncio.run(bounded([0, 1, 2, 3], work, 2))
    assert sorted(finished) == [1, 2, 3]


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_an_io_concurrency_out_of_range_fails_at_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError, match="RADFLOW_FORWARDER_IO_CONCURRENCY"):
        ForwarderSettings.from_env({"RADFLOW_FORWARDER_IO_CONCURRENCY": value})
    assert ForwarderSettings.from_env({}).io_concurrency == 8


def test_the_circuit_opens_after_repeated_failures_and_closes_after_a_probe() -> None:
    async def scenario() -> list[Circuit]:
        breaker = CircuitBreaker("unit", failures=2, cooldown_s=0.05)
        stopping = asyncio.Event()
        states = []
        breaker.failed()
        states.append(breaker.state)
        breaker.failed()
        states.append(breaker.state)
        async with breaker.attempt(stopping):  # waits out the cooldown, then probes
            states.append(breaker.state)
        breaker.failed()  # the probe failed: open again
        states.append(breaker.state)
        async with breaker.attempt(stopping):
            pass
        breaker.succeeded()
        states.append(breaker.state)
        return states

    assert asyncio.run(scenario()) == [
        Circuit.CLOSED,
        Circuit.OPEN,
        Circuit.HALF_OPEN,
        Circuit.OPEN,
        Circuit.CLOSED,
    ]


def test_routine_sends_wait_while_a_stat_send_is_in_progress() -> None:
    async def scenario() -> list[str]:
        gate = StatFirst()
        order: list[str] = []
        stat_inside = asyncio.Event()

        async def stat() -> None:
            async with gate.turn(Lane.STAT):
                stat_inside.set()
                await asyncio.sleep(0.05)
                order.append("stat")

        async def routine() -> None:
            await stat_inside.wait()
            async with gate.turn(Lane.ROUTINE):
                order.append("routine")

        await asyncio.gather(routine(), stat())
        return order

    assert asyncio.run(scenario()) == ["stat", "routine"]


def test_oauth2_tokens_are_cached_and_refreshed_once_on_401() -> None:
    issued: list[str] = []
    seen: list[str] = []

    def token_server(request: httpx.Request) -> httpx.Response:
        assert b"grant_type=client_credentials" in request.content
        issued.append(f"t{len(issued)}")
        return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 3600})

    def destination(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(401 if len(seen) == 2 else 200)

    async def scenario() -> None:
        tokens = httpx.AsyncClient(transport=httpx.MockTransport(token_server))
        auth = ClientCredentials("https://login/token", "id", "secret", "dicom", tokens)
        client = httpx.AsyncClient(transport=httpx.MockTransport(destination), auth=auth)
        assert (await client.post("https://d/studies")).status_code == 200
        assert (await client.post("https://d/studies")).status_code == 200  # 401, refreshed
        assert (await client.post("https://d/studies")).status_code == 200
        await client.aclose()
        await tokens.aclose()

    asyncio.run(scenario())
    assert issued == ["t0", "t1"]
    assert seen == ["Bearer t0", "Bearer t0", "Bearer t1", "Bearer t1"]


def _stow(url: str, **changes: object) -> Destination:
    fields: dict[str, object] = {"auth": None, "transfer_syntaxes": (), "max_batch": 50}
    return Destination("pacs", url, **{**fields, **changes})  # type: ignore[arg-type]


def _dimse(peer: DimsePeer) -> Destination:
    return Destination("pacs", str(peer), None, (), 50, kind=DestinationKind.DIMSE, dimse=peer)


STUDY = "1.2.3.4"


def test_a_delivery_marker_follows_the_destinations_address_not_its_name() -> None:
    base = _stow("https://pacs.example.org/dicom-web")
    same = [
        _stow("HTTPS://PACS.example.org:443/dicom-web/"),
        _stow("https://pacs.example.org/dicom-web", max_batch=5, lane=Lane.STAT),
        _stow(
            "https://pacs.example.org/dicom-web",
            auth=Auth(AuthKind.BEARER, token=SecretRef(env="TOKEN")),
            transfer_syntaxes=("1.2.840.10008.1.2.1",),
        ),
        Destination("renamed", base.url, None, (), 50),
    ]
    for destination in same:
        assert study_prefix(destination, STUDY) == study_prefix(base, STUDY), destination
    other = [
        _stow("https://pacs2.example.org/dicom-web"),
        _stow("https://pacs.example.org:8443/dicom-web"),
        _stow("http://pacs.example.org/dicom-web"),
        _stow("https://pacs.example.org/other/dicom-web"),
    ]
    for destination in other:
        assert study_prefix(destination, STUDY) != study_prefix(base, STUDY), destination


def test_a_study_has_one_marker_prefix_per_destination() -> None:
    base = _stow("https://pacs.example.org/dicom-web")
    assert study_prefix(base, STUDY) != study_prefix(base, "1.2.3.5")
    assert study_prefix(base, STUDY).endswith("/")
    assert STUDY not in study_prefix(base, STUDY), "no raw UID in a key"


def test_a_request_delivered_in_any_batch_marker_stays_delivered() -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    first = decode(encode({a: State.DELIVERED, b: State.SENDING}))
    assert first == {a: State.DELIVERED, b: State.SENDING}
    found: dict[str, State] = {}
    merge(found, first)
    merge(found, {a: State.SENDING, b: State.DELIVERED, c: State.SENDING})
    assert found == {a: State.DELIVERED, b: State.DELIVERED, c: State.SENDING}
    assert decode(b"garbage\n" + encode({c: State.SENDING})) == {c: State.SENDING}


def test_a_dimse_destinations_identity_is_its_host_port_and_called_ae_title() -> None:
    base = _dimse(DimsePeer("pacs.local", 104, "PACS"))
    assert base.identity == "dicom://PACS@pacs.local:104"
    assert _dimse(DimsePeer("PACS.local", 104, "PACS", calling_ae_title="OTHER")).identity == (
        base.identity
    )
    for peer in (
        DimsePeer("pacs2.local", 104, "PACS"),
        DimsePeer("pacs.local", 11112, "PACS"),
        DimsePeer("pacs.local", 104, "ARCHIVE"),
    ):
        assert study_prefix(_dimse(peer), STUDY) != study_prefix(base, STUDY), peer


async def test_a_tls_alert_read_with_the_answer_is_retried_as_tls_not_an_unexpected_error(
    tmp_path,
) -> None:
    """httpcore lets an SSLError raised while reading the answer (a server's "certificate
    required" alert after the handshake) through unwrapped; it must not escape the client
    (the consumer would dead-letter the batch as an unexpected error)."""
    rules = load_text(
        "version: 1\n"
        "destinations:\n"
        "  pacs: {url: 'https://pacs.example/dicom-web'}\n"
        "rules:\n"
        "  - name: all\n"
        "    route: [pacs]\n"
        "default: {hold: unrouted}\n",
        "rules.yaml",
    )
    client = StowClient(rules.destinations["pacs"], ForwarderSettings())

    def alert(_: httpx.Request) -> httpx.Response:
        raise ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] certificate required")

    await client.close()
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(alert))
    instance = tmp_path / "one.dcm"
    instance.write_bytes(b"\0" * 200)
    uid = generate_uid()
    try:
        answer = await client.store(
            [Outgoing(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", instance)],
            Lane.ROUTINE,
        )
        assert answer.peer_unavailable
        assert answer.retry[uid].startswith("TLS")
        assert await client.holds("1.2.3", [uid]) == set()
    finally:
        await client.close()


@pytest.mark.parametrize("status", [200, 202, 400, 409])
def test_a_destination_s_own_words_never_become_the_failure_message(status: int) -> None:
    """A PACS's error text (a body, a FailedSOPSequence's Error Comment) can quote the
    instance it refuses, patient data included: dead letters keep codes only."""
    said = "Patient DOE^SENTINEL MRN SENTINEL-4711 already exists"
    failed = json.loads(_response_body([], {"1.1": 0xC122}))
    failed["00081198"]["Value"][0]["00000902"] = {"vr": "LO", "Value": [said]}
    for body in (json.dumps(failed).encode(), said.encode(), f"<html>{said}</html>".encode()):
        answer = classify(_answer(status, body), ["1.1"])
        messages = [m for _, m in answer.refused.values()] + list(answer.retry.values())
        assert messages and not any("SENTINEL" in m for m in messages), (status, body)
