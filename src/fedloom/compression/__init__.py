"""Compression of what crosses the network: each site's update, and the global model.

The plan's ``compression`` section (:mod:`~fedloom.compression.settings`) picks a codec
(:mod:`~fedloom.compression.codecs`: float16 and bfloat16 casts, int8 with stochastic
rounding, topk with error feedback, zstd). A site encodes its update after the privacy
step (:mod:`~fedloom.compression.site`, called by the collaborator, so simulated and
real sites share it); topk's residuals are kept per site
(:mod:`~fedloom.compression.feedback`). The aggregator decodes each update as it streams
in, before its checks and its accumulator (:mod:`~fedloom.compression.stream`). An
encoded update is still weights (tensor names to arrays), so every transport and the
audit log carry it unchanged.
"""

from __future__ import annotations

from fedloom.compression.codecs import (
    Codec,
    Compression,
    ModelCodec,
    check_encoded,
    decode,
    decode_model,
    encode,
    encode_model,
    parts_of,
)
from fedloom.compression.feedback import ErrorFeedback
from fedloom.compression.settings import CompressionPlan, compression_problems
from fedloom.compression.site import SiteCompression, site_compression
from fedloom.compression.stream import UpdateDecoder

__all__ = [
    "Codec",
    "Compression",
    "CompressionPlan",
    "ErrorFeedback",
    "ModelCodec",
    "SiteCompression",
    "UpdateDecoder",
    "check_encoded",
    "compression_problems",
    "decode",
    "decode_model",
    "encode",
    "encode_model",
    "parts_of",
    "site_compression",
]
