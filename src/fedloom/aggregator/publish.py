"""Publication of the global model: the model codec, the signature, the chunks."""

from __future__ import annotations

from collections.abc import Iterator

from fedloom.aggregator.attempt import Attempt
from fedloom.aggregator.config import Signer
from fedloom.compression.codecs import ModelCodec, encode_model
from fedloom.core.clock import FaultPoints
from fedloom.core.weights import Weights
from fedloom.privacy.published import model_statement
from fedloom.transport.messages import Chunk


def published(opened: Attempt, weights: Weights, codec: ModelCodec) -> Weights:
    """The attempt's model as it travels: cast once under a model codec."""
    if codec is ModelCodec.NONE:
        return weights
    with opened.sign_lock:
        if opened.published is None:
            opened.published = encode_model(weights, codec)
        return opened.published


def model_signature(opened: Attempt, published: Weights, signer: Signer | None) -> bytes:
    """The signature over the attempt's model as it travels, made once (outside the
    round's lock: hashing a large model takes a while)."""
    if signer is None:
        return b""
    with opened.sign_lock:
        if opened.signature is None:
            statement = model_statement(opened.instruction.attempt_id, opened.round, published)
            opened.signature = signer(statement)
        return opened.signature


def sending(faults: FaultPoints, round: int, site: str, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """``chunks`` of a download, each announced to the ``download.chunk`` fault point."""
    for index, chunk in enumerate(chunks):
        faults.hit("download.chunk", round=round, site=site, index=index)
        yield chunk
