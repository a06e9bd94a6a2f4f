"""The plan's ``compression`` section, and how it fits the plan's privacy.

``update`` is how each site's update travels, ``model`` how the global model travels to
the sites. The cross-field rules live in :func:`compression_problems`, which the plan's
validation calls: a lossy update codec is refused under secure aggregation and under
DP-FedAvg, each with the reason and what to set instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from fedloom.compression.codecs import Codec, Compression, ModelCodec
from fedloom.core.frozen import Frozen

if TYPE_CHECKING:  # the plan holds both sections; this module needs privacy's only as a type
    from fedloom.privacy.settings import PrivacyPlan


class CompressionPlan(Frozen):
    update: Codec = Codec.NONE
    # the share of each tensor's values topk sends (read only with update: topk)
    topk_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.01
    model: ModelCodec = ModelCodec.NONE

    def settings(self) -> Compression:
        """What the round loop and the sites need."""
        return Compression(update=self.update, topk_fraction=self.topk_fraction, model=self.model)


def compression_problems(compression: CompressionPlan, privacy: PrivacyPlan) -> list[str]:
    """What is wrong with ``compression`` together with the plan's ``privacy``."""
    codec = compression.update
    if not codec.lossy:
        return []
    problems: list[str] = []
    if privacy.secure_aggregation is not None:
        problems.append(
            f"compression.update: {codec.value} is lossy, and secure aggregation sends each "
            "update as masked fixed-point integers: a lossy codec applied to them would "
            "break the unmasking of the sum, and applied before the masking it would save "
            "nothing (masked values are as wide as the ring and random); set "
            "compression.update to none or zstd, or remove privacy.secure_aggregation"
        )
    if privacy.dp is not None:
        feedback = (
            " (and topk's error feedback sends in later rounds what it held back)"
            if codec is Codec.TOPK
            else ""
        )
        problems.append(
            f"compression.update: {codec.value} changes the update after the site clipped it, "
            "so the L2 bound that DP-FedAvg's noise is calibrated to (privacy.dp.clip) would "
            f"no longer hold for what the aggregator decodes{feedback}; set "
            "compression.update to none or zstd (lossless), or remove privacy.dp"
        )
    return problems
