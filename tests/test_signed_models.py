"""Signed global models: the aggregator signs what it publishes with its key from the
federation's PKI; a site checks the signature before the task sees the weights, and
refuses a tampered or replayed model. Over real gRPC with mutual TLS on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ShiftRunner, federation_config, make_tiny_weights
from cryptography import x509
from grpcnet import GrpcTestTransport

from fedloom.aggregator import Aggregator
from fedloom.collaborator import Collaborator
from fedloom.compression.codecs import ModelCodec, decode_model, encode_model
from fedloom.core.errors import FedloomError, ModelRejected, QuorumError
from fedloom.core.records import CloseReason, FailureKind, Instruction, InstructionKind
from fedloom.core.weights import Weights, specs_of
from fedloom.pki import provision, server_credentials, site_credentials
from fedloom.pki.credentials import Credentials
from fedloom.privacy.final_model import check_final_model, keep_final_model
from fedloom.privacy.published import model_checker, model_statement, signer_from_pem
from fedloom.store import load_weights
from fedloom.strategies import FedAvg
from fedloom.transport.messages import Chunk, ModelHeader, ModelStream

pytestmark = pytest.mark.server

SITES = ("site-a", "site-b", "site-c")


class TamperedPath:
    """The aggregator's service as a compromised path in front of it would serve it:
    from ``round`` on, one bit of every model download is flipped (the same bit for
    every site, so the transport's checksums, computed on what it is handed, agree)."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.target: Any = None
        self.config = federation_config(roster=SITES, rounds=2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def download(self, site: str, round: int) -> ModelStream:
        stream = self.target.download(site, round)
        if round < self.round:
            return stream

        def flipped(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
            for index, chunk in enumerate(chunks):
                data = bytearray(chunk.data)
                if index == 0 and data:
                    data[0] ^= 0x01
                yield Chunk(chunk.tensor, chunk.offset, bytes(data), chunk.checksum)

        return ModelStream(stream.header, flipped(stream.chunks))


def grpc_federation(tmp_path: Path, tamper_from: int) -> tuple[Aggregator, GrpcTestTransport]:
    path = TamperedPath(tamper_from)
    transport = GrpcTestTransport(path, roster=SITES, workspace=tmp_path)
    key = server_credentials(tmp_path / "pki").key_pem
    aggregator = Aggregator(
        # a third suffices: the round waits for every site, so each one's reason is heard
        federation_config(roster=SITES, rounds=2, round_deadline=30.0, min_fraction=0.3),
        FedAvg(),
        make_tiny_weights(),
        signer=signer_from_pem(key),
    )
    path.target = aggregator
    return aggregator, transport


def start_sites(tmp_path: Path, transport: GrpcTestTransport) -> dict[str, ShiftRunner]:
    import threading

    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "aggregator.crt").read_bytes())
    runners = {}
    for index, site in enumerate(SITES):
        runners[site] = ShiftRunner(index, 10 * (index + 1))
        collaborator = Collaborator(
            transport.connect(site), runners[site], check_model=model_checker(cert)
        )
        threading.Thread(target=run_quietly, args=(collaborator,), daemon=True).start()
    return runners


def run_quietly(collaborator: Collaborator) -> None:
    try:
        collaborator.run()
    except (FedloomError, ValueError):
        pass  # the test closed the channel under it (grpc: "closed channel")


def test_signed_models_are_loaded_and_a_tampered_one_is_refused_before_the_task(
    tmp_path: Path,
) -> None:
    aggregator, transport = grpc_federation(tmp_path, tamper_from=2)
    try:
        runners = start_sites(tmp_path, transport)
        with pytest.raises(QuorumError):
            aggregator.run()
        first, second = aggregator.history[0], aggregator.history[1]
        assert first.close_reason is CloseReason.ALL_ANSWERED  # round 1: signed, untouched
        assert second.round == 2 and second.close_reason is CloseReason.NO_QUORUM
        for failure in second.failures:
            assert failure.kind is FailureKind.ERROR
            assert "failed its signature check" in failure.reason
        for runner in runners.values():  # the task never saw the tampered model
            assert [c.round for c in runner.calls] == [1]
    finally:
        transport.close()


def test_the_check_refuses_unsigned_replayed_and_altered_models(tmp_path: Path) -> None:
    from fedloom.pki import provision

    provision(tmp_path, SITES)
    key = server_credentials(tmp_path / "pki").key_pem
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "aggregator.crt").read_bytes())
    sign = signer_from_pem(key)
    weights = make_tiny_weights()
    task = Instruction(round=3, kind=InstructionKind.TRAIN, attempt_id="run/3.1")
    from fedloom.core.weights import specs_of

    header = ModelHeader(
        3, specs_of(weights), "run/3.1", sign(model_statement("run/3.1", 3, weights))
    )
    check = model_checker(cert)
    check(task, header, weights)  # signed and untouched: loaded

    with pytest.raises(ModelRejected, match="unsigned"):
        check(task, ModelHeader(3, specs_of(weights), "run/3.1"), weights)
    with pytest.raises(ModelRejected, match="replayed"):
        check(
            Instruction(round=3, kind=InstructionKind.TRAIN, attempt_id="run/3.2"), header, weights
        )
    altered = {k: v.copy() for k, v in weights.items()}
    altered["b"][0] = np.nextafter(altered["b"][0], np.float32(2))  # one ulp
    with pytest.raises(ModelRejected, match="signature check"):
        check(task, header, altered)
    # another key (a second federation's CA) does not verify either
    other = tmp_path / "other"
    provision(other, SITES)
    stranger = x509.load_pem_x509_certificate((other / "pki" / "aggregator.crt").read_bytes())
    with pytest.raises(ModelRejected, match="signature check"):
        model_checker(stranger)(task, header, weights)


def keep_signed(
    state: Path,
    credentials: Credentials,
    weights: Weights,
    codec: ModelCodec,
    attempt_id: str = "4f2a9c/3.1",
) -> Path:
    """Keep ``weights`` as a site does at the final evaluation, the model having
    travelled under ``codec`` and been signed with ``credentials``' key."""
    travelled = encode_model(weights, codec)
    signature = signer_from_pem(credentials.key_pem)(model_statement(attempt_id, 3, travelled))
    header = ModelHeader(3, specs_of(travelled), attempt_id, signature)
    return keep_final_model(
        state,
        header,
        decode_model(travelled, codec),
        plan_hash="ab" * 32,
        site="site-a",
        aggregator_cert=credentials.cert_pem,
        model_codec=codec,
    )


def test_a_kept_final_model_verifies_only_as_the_aggregator_signed_it(tmp_path: Path) -> None:
    state = provision(tmp_path, ["site-a"])["site-a"]
    ca_pem = (tmp_path / "pki" / "ca.crt").read_bytes()
    aggregator = server_credentials(tmp_path / "pki")
    weights = make_tiny_weights()
    kept = keep_signed(state, aggregator, weights, ModelCodec.NONE)
    assert kept == state / "final" / "4f2a9c.safetensors"
    info, _ = check_final_model(kept, ca_pem)
    assert (info.attempt_id, info.round, info.site) == ("4f2a9c/3.1", 3, "site-a")
    # under a model codec the site keeps the model in its own dtypes, and it verifies
    narrowed = keep_signed(state, aggregator, weights, ModelCodec.FLOAT16, "5b3e1d/3.1")
    check_final_model(narrowed, ca_pem)
    assert load_weights(narrowed)["w"].dtype == np.float32
    # a site's own certificate, issued by the same CA, cannot publish a model
    forged = keep_signed(state, site_credentials(state), weights, ModelCodec.NONE, "6c4f2e/3.1")
    with pytest.raises(FedloomError, match="not the aggregator's") as refused:
        check_final_model(forged, ca_pem)
    assert refused.value.exit_code == 13
    # nor does another federation's CA vouch for this one's aggregator
    provision(tmp_path / "other", ["site-a"])
    other_ca = (tmp_path / "other" / "pki" / "ca.crt").read_bytes()
    with pytest.raises(FedloomError, match="not issued by the federation's CA"):
        check_final_model(kept, other_ca)
