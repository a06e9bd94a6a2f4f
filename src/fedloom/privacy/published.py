"""Signed global models: the aggregator signs what it publishes, sites check it.

The signature covers the attempt id (so a model cannot be replayed into another round),
the tensor specs and every byte of every tensor, in order: what
:func:`~fedloom.privacy.signing.model_message` binds together. A site checks it with the
aggregator's certificate, itself checked against the federation's CA, before the task
ever sees the weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedloom.core.errors import CertificateError, ModelRejected
from fedloom.core.records import Instruction
from fedloom.core.weights import TensorSpec, Weights, specs_of
from fedloom.privacy.signing import model_message, sign, verify
from fedloom.transport.messages import ModelHeader, iter_chunks


def specs_digest(specs: tuple[TensorSpec, ...]) -> bytes:
    text = json.dumps([[s.name, s.dtype, list(s.shape)] for s in specs], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def content_digest(weights: Weights) -> bytes:
    h = hashlib.sha256()
    for chunk in iter_chunks(weights):
        h.update(chunk.data)
    return h.digest()


def model_statement(attempt_id: str, round: int, weights: Weights) -> bytes:
    """What the aggregator signs for the model of ``attempt_id``."""
    return model_message(
        attempt_id, round, specs_digest(specs_of(weights)), content_digest(weights)
    )


def signer_from_pem(key_pem: bytes) -> Callable[[bytes], bytes]:
    """Signs with the aggregator's key (PEM): the global models it publishes and the
    receipts it returns."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the aggregator's key is not an EC key: run `fedloom pki server`")

    def sign_message(message: bytes) -> bytes:
        return sign(key, message)

    return sign_message


def model_checker(
    certificate: x509.Certificate,
) -> Callable[[Instruction, ModelHeader, Weights], None]:
    """A :data:`~fedloom.collaborator.ModelCheck` that refuses any global model not
    signed by ``certificate``'s key for the instruction's task."""

    def check(instruction: Instruction, header: ModelHeader, weights: Weights) -> None:
        where = f"the global model of round {instruction.round} (task {instruction.attempt_id})"
        if not header.signature:
            raise ModelRejected(
                f"{where} is unsigned; this site loads only models the aggregator signed",
                hint="the aggregator must run with the federation's PKI (fedloom pki init)",
            )
        if header.attempt_id != instruction.attempt_id:
            raise ModelRejected(
                f"{where} was published for task {header.attempt_id or '(none)'}: a replayed "
                "model; it was not loaded"
            )
        statement = model_statement(instruction.attempt_id, instruction.round, weights)
        if not verify(certificate, statement, header.signature):
            raise ModelRejected(
                f"{where} failed its signature check: its bytes are not what the "
                "aggregator signed (tampered with on the way?); it was not loaded",
                hint="check the network path to the aggregator; the round goes on without "
                "this site",
            )

    return check
