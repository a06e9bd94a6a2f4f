"""Secure aggregation against an aggregator that lies about keys, over real gRPC with
mutual TLS and certificates from fedloom's own PKI.

The test plays the aggregator: a real :class:`~fedloom.aggregator.Aggregator`
behind a :class:`Liar` that rewrites the secure-aggregation messages it relays. Each
site signs its keys with its own certificate's key and signs the key set it saw; each
one checks the others' signatures (against certificates chained to the federation's
CA, named after the site) and the consistency of the key set. A lie must end with the
sites that saw it refusing to send a masked update, each naming the reason, and no
masked update reaching the aggregator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from grpcnet import GrpcTestTransport

from fedloom.core.errors import QuorumError
from fedloom.core.records import CloseReason, Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.pki import server_credentials, site_credentials
from fedloom.pki.common import load_cert, load_private_key
from fedloom.privacy import masking, signing
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.identity import SimulatedAuthority, SiteIdentity
from fedloom.privacy.secagg import KEYS, SHARES
from fedloom.privacy.settings import PrivacyPlan, SecureAggregationPlan
from fedloom.privacy.site import SitePrivacy
from fedloom.transport.messages import ExchangeMessage

pytestmark = pytest.mark.server

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
SAMPLES = {"site-a": 30, "site-b": 50, "site-c": 20, "site-d": 40, "site-e": 60}
REFUSED = "so this site sends no masked update this round"

Rewrite = Callable[[str, dict[str, Any], dict[str, Any]], dict[str, Any]]
"""(site, what the site sent, what the real aggregator answered) -> what the site gets."""


def model() -> Weights:
    return {"w": np.zeros((4, 5), dtype=np.float32), "b": np.zeros(3, dtype=np.float64)}


def delta_of(site: str) -> Weights:
    rng = np.random.default_rng(SITES.index(site))
    return {"w": rng.normal(0, 0.2, (4, 5)).astype(np.float32), "b": rng.uniform(-1, 1, 3)}


def runner(site: str) -> Callable[[Instruction, Weights], SiteAnswer]:
    def run(instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(SAMPLES[site], {"loss": 1.0}, None)
        return SiteAnswer(SAMPLES[site], {"loss": 1.0}, delta_of(site))

    return run


class Liar:
    """The aggregator as the sites see it: the real one, except that the test may
    rewrite what it relays in the two key steps (``keys``: the key set sent to a site;
    ``shares_in``: a site's shares before the real aggregator sees them, given as the
    answer; ``shares_out``: the answer to a site's shares). It also records every
    upload that reaches it."""

    def __init__(
        self,
        aggregator: Any,
        *,
        keys: Rewrite | None = None,
        shares_in: Rewrite | None = None,
        shares_out: Rewrite | None = None,
    ) -> None:
        self._aggregator = aggregator
        self.keys, self.shares_in, self.shares_out = keys, shares_in, shares_out
        self.uploads: list[str] = []
        self.reports: dict[str, str] = {}  # site -> the reason it reported for failing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aggregator, name)

    def exchange(self, site: str, message: ExchangeMessage) -> ExchangeMessage:
        payload = bytes(message.payload)
        sent = json.loads(payload) if message.step in (KEYS, SHARES) else {}
        if message.step == SHARES and self.shares_in is not None:
            payload = json.dumps(self.shares_in(site, sent, sent)).encode()
        reply = self._aggregator.exchange(
            site, ExchangeMessage(message.round, message.step, payload)
        )
        rewrite = {KEYS: self.keys, SHARES: self.shares_out}.get(message.step)
        if rewrite is None:
            return reply
        told = rewrite(site, sent, json.loads(bytes(reply.payload)))
        return ExchangeMessage(reply.round, reply.step, json.dumps(told).encode())

    def report_failure(self, site: str, report: Any) -> None:
        self.reports[site] = report.reason
        self._aggregator.report_failure(site, report)

    def upload(self, site: str, header: Any, chunks: Any) -> Any:
        self.uploads.append(site)
        return self._aggregator.upload(site, header, chunks)


def run_federation(
    make_federation: Any, tmp_path: Path, *, min_fraction: float = 1.0, **lies: Rewrite
) -> tuple[Any, Liar]:
    """Five sites over gRPC, one round under secure aggregation, the aggregator behind
    a :class:`Liar` telling ``lies``; each site signs with its own certificate's key."""
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=64))
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    made: list[tuple[Liar, GrpcTestTransport]] = []

    def transport(aggregator: Any) -> GrpcTestTransport:
        liar = Liar(aggregator, **lies)
        made.append((liar, GrpcTestTransport(liar, roster=SITES, workspace=tmp_path)))
        return made[-1][1]

    fed = make_federation(
        model(), transport=transport, privacy=privacy, roster=SITES, rounds=1,
        sites_per_round=len(SITES), min_fraction=min_fraction, max_samples=100,
        final_evaluation=False,
    )  # fmt: skip
    liar, grpc = made[0]
    fed.closers.append(grpc.close)
    # as `fedloom aggregator` does: keys from a certificate of another CA are refused
    privacy.site_ca = load_cert((tmp_path / "pki" / "ca.crt").read_bytes(), "CA certificate")
    for site in SITES:
        identity = SiteIdentity.from_credentials(site, site_credentials(grpc.states[site]))
        privacy_here = SitePrivacy(
            site, plan, per_round=len(SITES), max_samples=100, identity=identity
        )
        fed.start_site(site, runner(site), privacy=privacy_here)
    fed.start()
    return fed, liar


@pytest.fixture
def closing_federation(make_federation: Any) -> Any:
    """``make_federation`` whose federations also close their gRPC transports."""
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        fed = make_federation(*args, **kwargs)
        fed.closers = []
        made.append(fed)
        return fed

    yield make
    for fed in made:
        for close in fed.closers:
            close()


def refusals(fed: Any, liar: Liar, sites: tuple[str, ...] = SITES) -> dict[str, str]:
    """The reason each of ``sites`` reported for not answering the federation's one
    round (the aggregator closes the round as soon as its quorum is out of reach, so
    the reports are read as they reach it); the round must end without its quorum and
    with the model unchanged."""
    wait_until(lambda: set(sites) <= set(liar.reports), f"{sites} to report their refusals")
    with pytest.raises(QuorumError):
        fed.finish()
    record = fed.aggregator.history[0]
    assert record.close_reason is CloseReason.NO_QUORUM
    assert not np.any(fed.aggregator.weights["w"])
    return dict(liar.reports)


def entry_of(key_set: dict[str, Any], site: str) -> dict[str, Any]:
    [entry] = [e for e in key_set["sites"] if e["site"] == site]
    return entry


# ------------------------------------------------------------- honest, for contrast


def test_an_honest_aggregator_over_grpc_unmasks_the_plain_sum(
    closing_federation: Any, tmp_path: Path
) -> None:
    """The same harness with nothing rewritten: every signature checks, the round
    closes with all five masked updates, and the model moves by the plain mean."""
    fed, liar = run_federation(closing_federation, tmp_path)
    [record] = fed.finish()
    assert record.close_reason is CloseReason.ALL_ANSWERED
    assert sorted(liar.uploads) == list(SITES)
    total = sum(SAMPLES.values())
    for name in ("w", "b"):
        want = sum(SAMPLES[s] * delta_of(s)[name].astype(np.float64) for s in SITES) / total
        assert np.allclose(fed.aggregator.weights[name], want, atol=1e-6)


# ------------------------------------------------------------- key substitution


def liars_keys() -> tuple[str, str]:
    return masking.new_key_pair().public.hex(), masking.new_key_pair().public.hex()


def substitute(resign: Callable[[str, dict[str, Any]], None] | None) -> Rewrite:
    """In the key set every site is shown, site-c's keys replaced by the liar's own
    (and re-signed by ``resign``, else with site-c's signature left as it was)."""
    c, s = liars_keys()

    def rewrite(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        entry = entry_of(key_set, "site-c")
        entry["c"], entry["s"] = c, s
        if resign is not None:
            resign(sent["attempt"], entry)
        return key_set

    return rewrite


def with_aggregator_key(tmp_path: Path) -> Callable[[str, dict[str, Any]], None]:
    """Re-sign with the aggregator's own key and certificate: issued by the federation's
    CA, but not to site-c (nor to any site)."""

    def resign(task: str, entry: dict[str, Any]) -> None:
        credentials = server_credentials(tmp_path / "pki")  # made with the federation
        key = load_private_key(credentials.key_pem, "aggregator key")
        message = signing.secagg_keys_message(
            task, "site-c", bytes.fromhex(entry["c"]), bytes.fromhex(entry["s"])
        )
        entry["certificate"] = credentials.cert_pem.decode()
        entry["signature"] = signing.sign(key, message).hex()

    return resign


def with_own_ca() -> Callable[[str, dict[str, Any]], None]:
    """Re-sign with a key and a certificate naming site-c from a CA the liar made."""
    forged = SimulatedAuthority("the liar's").identity("site-c")

    def resign(task: str, entry: dict[str, Any]) -> None:
        message = signing.secagg_keys_message(
            task, "site-c", bytes.fromhex(entry["c"]), bytes.fromhex(entry["s"])
        )
        entry["certificate"] = forged.certificate_pem
        entry["signature"] = forged.sign(message).hex()

    return resign


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("signature kept", "the keys given for 'site-c' do not carry its signature"),
        ("aggregator's key", "the certificate names 'aggregator', not 'site-c'"),
        ("liar's own CA", "was not issued by the federation's CA"),
    ],
)
def test_a_substituted_key_is_refused_by_every_honest_site(
    closing_federation: Any, tmp_path: Path, how: str, reason: str
) -> None:
    """The liar replaces site-c's public keys with its own in the key set it shows
    every site. Each site refuses before it sends any share: the others because the
    keys do not carry site-c's signature, site-c because its own keys came back
    changed. No masked update leaves any site."""
    resign = {
        "signature kept": None,
        "aggregator's key": with_aggregator_key(tmp_path),
        "liar's own CA": with_own_ca(),
    }[how]
    fed, liar = run_federation(closing_federation, tmp_path, keys=substitute(resign))
    reasons = refusals(fed, liar)
    assert sorted(reasons) == list(SITES)
    for site, why in reasons.items():
        assert REFUSED in why, (site, why)
        if site == "site-c":
            assert "this site's own keys ('site-c') are not as it sent them" in why
        else:
            assert reason in why, (site, why)
    assert liar.uploads == []


def test_a_key_substituted_for_everyone_but_its_owner_is_refused_by_every_site(
    closing_federation: Any, tmp_path: Path
) -> None:
    """The quieter attack: site-c itself is shown the honest key set, so its own check
    passes. Every other site refuses the substituted keys; site-c then finds that no
    other site took part in the share step, and sends nothing either (its reason is the
    aggregator's or its own check's, whichever comes first)."""
    lie = substitute(None)

    def spare_c(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        return key_set if site == "site-c" else lie(site, sent, key_set)

    fed, liar = run_federation(closing_federation, tmp_path, keys=spare_c)
    reasons = refusals(fed, liar)
    assert sorted(reasons) == list(SITES)
    for site, why in reasons.items():
        if site != "site-c":
            assert REFUSED in why and "'site-c' do not carry its signature" in why, why
    assert liar.uploads == []


def test_a_forged_signature_is_refused(closing_federation: Any, tmp_path: Path) -> None:
    """The liar leaves site-d's keys alone but alters its signature in the key set the
    other sites see: each of them refuses, naming site-d. site-d, told nothing false,
    finds the attempt over (no other site took part) and sends nothing either."""

    def forge(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        if site != "site-d":
            entry = entry_of(key_set, "site-d")
            signature = bytearray.fromhex(entry["signature"])
            signature[-1] ^= 0x01
            entry["signature"] = signature.hex()
        return key_set

    fed, liar = run_federation(closing_federation, tmp_path, keys=forge)
    reasons = refusals(fed, liar)
    assert sorted(reasons) == list(SITES)
    for site, why in reasons.items():
        if site != "site-d":
            assert REFUSED in why and "'site-d' do not carry its signature" in why, why
    assert liar.uploads == []


def test_a_forged_signature_over_the_key_set_is_refused(
    closing_federation: Any, tmp_path: Path
) -> None:
    """The key step goes honestly, but in the answer to the share step the liar puts a
    signature of its own for site-b's over the key set: every other site refuses at the
    consistency check, naming site-b. site-b, told nothing false, sends its masked
    update, but no other site reveals a share, so it is never unmasked."""

    def forge(site: str, sent: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        if site != "site-b":
            credentials = server_credentials(tmp_path / "pki")  # made with the federation
            key = load_private_key(credentials.key_pem, "aggregator key")
            answer["key_set"]["site-b"] = signing.sign(key, b"anything").hex()
        return answer

    others = ("site-a", "site-c", "site-d", "site-e")
    fed, liar = run_federation(closing_federation, tmp_path, shares_out=forge)
    reasons = refusals(fed, liar, others)
    for site in others:
        why = reasons[site]
        assert REFUSED in why and "'site-b' did not sign the key set this site saw" in why, why
        assert "share step" in why
    assert liar.uploads in ([], ["site-b"])


# ------------------------------------------------------- a key set with a site missing


def test_a_site_left_out_of_one_sites_key_set_is_caught_by_every_site(
    closing_federation: Any, tmp_path: Path
) -> None:
    """The liar shows site-a a key set without site-e (every entry in it genuine) and
    the others the whole set, then passes site-a's shares on with a dummy one for
    site-e so the real aggregator takes them. The signatures over the key set do not
    match: site-a refuses naming the others, every other site refuses naming site-a."""

    def hide_e(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        if site == "site-a":
            key_set["sites"] = [e for e in key_set["sites"] if e["site"] != "site-e"]
        return key_set

    def cover_up(site: str, sent: dict[str, Any], shares: dict[str, Any]) -> dict[str, Any]:
        if site == "site-a":
            shares["to"]["site-e"] = "00" * 64
        return shares

    fed, liar = run_federation(closing_federation, tmp_path, keys=hide_e, shares_in=cover_up)
    reasons = refusals(fed, liar)
    assert sorted(reasons) == list(SITES)
    for site, why in reasons.items():
        assert REFUSED in why and "the share step fails its checks" in why, (site, why)
        if site == "site-a":
            for other in ("site-b", "site-c", "site-d"):
                assert f"'{other}' did not sign the key set this site saw" in why
            assert "sites outside the key set are said to have sent shares: ['site-e']" in why
        else:
            assert "'site-a' did not sign the key set this site saw" in why, (site, why)
    assert liar.uploads == []


def test_a_key_set_naming_a_site_twice_is_refused_and_the_others_go_on(
    closing_federation: Any, tmp_path: Path
) -> None:
    """The liar shows site-a a key set with site-b twice: once as site-b sent it, once
    with the liar's keys under site-b's signature. site-a refuses; the others saw an
    honest key set, so the round goes on without site-a and ends with the plain mean
    of the four (2 of 5 may fail: min_fraction 0.6)."""
    c, s = liars_keys()

    def twice(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        if site == "site-a":
            key_set["sites"].append({**entry_of(key_set, "site-b"), "c": c, "s": s})
        return key_set

    fed, liar = run_federation(closing_federation, tmp_path, min_fraction=0.6, keys=twice)
    [record] = fed.finish()
    assert record.close_reason is CloseReason.QUORUM
    assert [r.site for r in record.results] == ["site-b", "site-c", "site-d", "site-e"]
    [failure] = record.failures
    assert failure.site == "site-a"
    assert REFUSED in failure.reason and "'site-b' appears more than once" in failure.reason
    assert "site-a" not in liar.uploads
    four = ("site-b", "site-c", "site-d", "site-e")
    total = sum(SAMPLES[x] for x in four)
    for name in ("w", "b"):
        want = sum(SAMPLES[x] * delta_of(x)[name].astype(np.float64) for x in four) / total
        assert np.allclose(fed.aggregator.weights[name], want, atol=1e-6)


def test_the_threshold_is_the_sites_own_not_the_aggregators(
    closing_federation: Any, tmp_path: Path
) -> None:
    """A threshold of one share would let the liar rebuild a site's mask seed and mask
    key from two different neighbours: every site refuses the aggregator's word for it
    and keeps its own plan's."""

    def lower(site: str, sent: dict[str, Any], key_set: dict[str, Any]) -> dict[str, Any]:
        key_set["threshold"] = 0.2
        return key_set

    fed, liar = run_federation(closing_federation, tmp_path, keys=lower)
    reasons = refusals(fed, liar)
    assert sorted(reasons) == list(SITES)
    for why in reasons.values():
        assert REFUSED in why and "the aggregator asks for threshold 0.2" in why, why
    assert liar.uploads == []


# --------------------------------------------- the aggregator refuses unsigned keys


def test_the_aggregator_refuses_keys_not_signed_by_the_sites_own_certificate() -> None:
    """A site whose keys are unsigned, or signed with another site's certificate, is
    refused alone at the key step (rather than making every other site refuse the
    round); shares without a signature over the key set are refused too."""
    import threading

    from fedloom.core.clock import ManualClock
    from fedloom.core.errors import UpdateRejected
    from fedloom.core.weights import specs_of
    from fedloom.privacy.secagg import dumps
    from fedloom.privacy.secagg_server import SecAggParameters, SecAggRound

    round_ = SecAggRound(
        attempt_id="run/1.1", round=1, selected=SITES, specs=specs_of(model()),
        params=SecAggParameters(
            bits=32, frac=16, threshold=2 / 3, neighbours=None, key_seconds=60.0,
            clip_range=1.0,
        ),
        clock=ManualClock(), cond=threading.Condition(), in_round=lambda: SITES,
        drop=lambda site, reason: None,
    )  # fmt: skip
    authority = SimulatedAuthority()
    c, s = liars_keys()
    keys = {"attempt": "run/1.1", "c": c, "s": s}
    with pytest.raises(UpdateRejected, match="must come signed"):
        round_.handle("site-a", KEYS, dumps(keys))
    b = authority.identity("site-b")
    message = signing.secagg_keys_message("run/1.1", "site-a", bytes.fromhex(c), bytes.fromhex(s))
    by_b = {**keys, "certificate": b.certificate_pem, "signature": b.sign(message).hex()}
    with pytest.raises(UpdateRejected, match="names 'site-b'"):
        round_.handle("site-a", KEYS, dumps(by_b))
    a = authority.identity("site-a")
    other = signing.secagg_keys_message("run/1.1", "site-a", bytes.fromhex(s), bytes.fromhex(c))
    wrong = {**keys, "certificate": a.certificate_pem, "signature": a.sign(other).hex()}
    with pytest.raises(UpdateRejected, match="not signed by its own certificate"):
        round_.handle("site-a", KEYS, dumps(wrong))
    with pytest.raises(UpdateRejected, match="signature over the key set"):
        round_.handle("site-a", SHARES, dumps({"to": {}}))
    assert round_.describe()["keys"] == 0  # nothing of the refused messages was kept

    # an aggregator that knows the federation's CA refuses a certificate from another
    federation = SimulatedAuthority("the federation's")
    checked = SecAggRound(
        attempt_id="run/1.1", round=1, selected=SITES, specs=specs_of(model()),
        params=round_.params, clock=ManualClock(), cond=threading.Condition(),
        in_round=lambda: SITES, drop=lambda site, reason: None, site_ca=federation.ca,
    )  # fmt: skip
    signed = {**keys, "certificate": a.certificate_pem, "signature": a.sign(message).hex()}
    with pytest.raises(UpdateRejected, match="not issued by the federation's CA"):
        checked.handle("site-a", KEYS, dumps(signed))
    assert checked.describe()["keys"] == 0


# ------------------------------------------------------------ the pure pieces


def test_the_key_set_digest_ignores_order_and_sees_every_change() -> None:
    from fedloom.privacy.secagg import key_set_digest

    keys = {
        name: {"c": bytes([i]) * 32, "s": bytes([i + 100]) * 32} for i, name in enumerate(SITES)
    }
    digest = key_set_digest("run/1.1", keys)
    assert key_set_digest("run/1.1", dict(reversed(list(keys.items())))) == digest
    changed = [
        key_set_digest("run/1.2", keys),  # another attempt
        key_set_digest("run/1.1", {k: v for k, v in keys.items() if k != "site-e"}),
        key_set_digest("run/1.1", {**keys, "site-c": {**keys["site-c"], "s": b"\x07" * 32}}),
        key_set_digest("run/1.1", {**keys, "site-f": keys["site-a"]}),
    ]
    assert len({digest, *changed}) == 5


def test_the_signed_messages_are_domain_separated_and_refuse_bad_input() -> None:
    c, s = b"\x01" * 32, b"\x02" * 32
    keys = signing.secagg_keys_message("run/1.1", "site-a", c, s)
    assert keys.startswith(signing.SECAGG_KEYS_TAG)
    assert keys != signing.secagg_keys_message("run/1.1", "site-b", c, s)
    assert keys != signing.secagg_keys_message("run/1.1", "site-a", s, c)  # roles matter
    key_set = signing.secagg_key_set_message("run/1.1", b"\x03" * 32)
    assert key_set.startswith(signing.SECAGG_KEY_SET_TAG)
    tags = {signing.SECAGG_KEYS_TAG, signing.SECAGG_KEY_SET_TAG}
    assert len(tags | {signing.MODEL_TAG, signing.RECEIPT_TAG}) == 4
    with pytest.raises(ValueError, match="32 bytes"):
        signing.secagg_keys_message("run/1.1", "site-a", c[:31], s)
    with pytest.raises(ValueError, match="32 bytes"):
        signing.secagg_key_set_message("run/1.1", b"\x03" * 31)
    with pytest.raises(ValueError, match="NUL"):
        signing.secagg_keys_message("run/1.1", "site-a\0site-b", c, s)
    identity = SimulatedAuthority().identity("site-a")
    signature = identity.sign(keys)
    assert signing.verify(identity.certificate, keys, signature)
    assert not signing.verify(identity.certificate, key_set, signature)


def test_a_sites_identity_is_its_own_certificate_and_key(tmp_path: Path) -> None:
    from fedloom.core.errors import CertificateError
    from fedloom.pki import provision
    from fedloom.pki.credentials import Credentials

    (tmp_path / "federation.yaml").write_text("name: test\n")
    states = provision(tmp_path, ("site-a", "site-b"))
    a, b = (site_credentials(states[name]) for name in ("site-a", "site-b"))
    identity = SiteIdentity.from_credentials("site-a", a)
    assert identity.site == "site-a" and "key=<private>" in repr(identity)  # never printed
    with pytest.raises(CertificateError, match="names 'site-a', not 'site-b'"):
        SiteIdentity.from_credentials("site-b", a)
    mixed = Credentials(key_pem=b.key_pem, cert_pem=a.cert_pem, ca_pem=a.ca_pem)
    with pytest.raises(CertificateError, match="does not hold the public half"):
        SiteIdentity.from_credentials("site-a", mixed)
