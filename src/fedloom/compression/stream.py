"""The aggregator's side: an encoded update decoded as it streams in.

:class:`UpdateDecoder` checks what an update announces against the encoding of the
model (:func:`~fedloom.compression.codecs.check_encoded`) before a byte is taken, and
wraps the accumulator's :class:`~fedloom.accumulate.Contribution` in a
:class:`DecodingContribution`: every chunk is checked as any update's is (order, size,
element boundaries), each model tensor is decoded as soon as all its parts have arrived,
and the decoded tensor streams into the accumulator, which checks it like any update
(finite, in range) and folds it. So the aggregator's validation and accumulation see
only tensors of the model's dtypes and shapes, whatever the codec.

Memory: the encoded parts of one model tensor, and that tensor decoded, per update in
flight; never the whole update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloom.accumulate.contribution import PIECE_BYTES, Contribution
from fedloom.compression.codecs import Compression, check_encoded, decode_tensor
from fedloom.core.weights import TensorSpec


class UpdateDecoder:
    """What an update announced (``sent``), checked to be the encoding of ``model``;
    :class:`~fedloom.core.errors.UpdateRejected` otherwise."""

    def __init__(
        self, sent: Sequence[TensorSpec], model: Sequence[TensorSpec], compression: Compression
    ) -> None:
        self.sent = tuple(sent)
        self.model = tuple(model)
        self.compression = compression
        self.counts = check_encoded(self.sent, self.model, compression)

    def wrap(self, inner: Contribution) -> DecodingContribution:
        """A contribution taking the encoded chunks and feeding ``inner`` decoded ones."""
        return DecodingContribution(self, inner)


class DecodingContribution(Contribution):
    """Takes an encoded update chunk by chunk and streams each model tensor, decoded,
    into ``inner``. Aborting it aborts ``inner``; finishing it finishes ``inner``."""

    def __init__(self, decoder: UpdateDecoder, inner: Contribution) -> None:
        super().__init__(decoder.sent, inner.site, inner.sample_weight)
        self._decoder = decoder
        self._inner = inner
        self._group: list[int] = []  # sent tensor -> model tensor
        self._first: list[int] = []  # model tensor -> its first sent tensor
        for index, count in enumerate(decoder.counts):
            self._first.append(len(self._group))
            self._group.extend([index] * count)
        self._left = list(decoder.counts)  # parts still incomplete, per model tensor
        self._done = [False] * len(decoder.sent)
        self._parts: list[bytearray | None] = [None] * len(decoder.sent)

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        spec = self.specs[tensor]
        data = self._parts[tensor]
        if data is None:
            data = self._parts[tensor] = bytearray(spec.nbytes)
        data[offset : offset + len(raw)] = raw
        if offset + len(raw) < spec.nbytes or self._done[tensor]:
            return
        self._done[tensor] = True
        group = self._group[tensor]
        self._left[group] -= 1
        if self._left[group] == 0:
            self._decode(group)

    def _decode(self, group: int) -> None:
        first = self._first[group]
        count = self._decoder.counts[group]
        parts = []
        for index in range(first, first + count):
            spec, data = self.specs[index], self._parts[index]
            array = np.frombuffer(data or bytearray(), dtype=self._dtypes[index])
            parts.append(array.reshape(spec.shape))
        model = self._decoder.model[group]
        decoded = decode_tensor(model, parts, self._decoder.compression)
        for index in range(first, first + count):
            self._parts[index] = None  # the parts are no longer needed
        raw = np.ascontiguousarray(decoded).reshape(-1).view(np.uint8).data
        if not len(raw):
            self._inner.add(group, 0, b"")
        for start in range(0, len(raw), PIECE_BYTES):
            self._inner.add(group, start, raw[start : start + PIECE_BYTES])

    def _commit(self) -> None:
        self._inner.finish()

    def _undo(self) -> None:
        self._parts = [None] * len(self.specs)
        self._inner.abort(self._ended or "the update was abandoned")
