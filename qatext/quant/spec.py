"""QuantSpec: what a quantized linear layer stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .primitives import qmax


@dataclass(frozen=True)
class QuantSpec:
    """bits in 2..8; group_size divides in_features or is -1 (per-channel); symmetric fixes z = 2^(b-1)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"QuantSpec.group_size must be a positive int or -1 (per-channel), got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        return qmax(self.bits)

    def groups(self, in_features: int) -> int:
        return in_features // self.resolved_group_size(in_features)

    def resolved_group_size(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(f"group_size ({self.group_size}) must divide in_features ({in_features})")
        return g

    def to_dict(self) -> dict:
        return asdict(self)
