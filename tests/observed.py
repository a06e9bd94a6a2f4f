"""What the aggregator receives, seen from outside its transport: every byte of every
upload, per site and round (the secure-aggregation tests check it is masked)."""

from __future__ import annotations

from typing import Any

from fedloom.transport.messages import Chunk, UpdateHeader, UploadReceipt


class Observed:
    """The aggregator's side of the transport, seen from outside: every byte of every
    upload as it reaches the aggregator, per site and round."""

    def __init__(self, aggregator: Any) -> None:
        self._aggregator = aggregator
        self.uploads: dict[tuple[str, int], list[bytes]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aggregator, name)

    def upload(self, site: str, header: UpdateHeader, chunks: Any) -> UploadReceipt:
        seen = self.uploads.setdefault((site, header.round), [])

        def watched() -> Any:
            for chunk in chunks:
                seen.append(bytes(chunk.data))
                yield Chunk(chunk.tensor, chunk.offset, chunk.data, chunk.checksum)

        return self._aggregator.upload(site, header, watched())
