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
        self.check(self.bits, self.group_size)

    @staticmethod
    def check(bits, group_size, bits_name: str = "QuantSpec.bits", group_size_name: str = "QuantSpec.group_size"):
        """ValueError unless bits and group_size are valid, naming each as its caller calls it (a CLI: its flags)."""
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"{bits_name} must be an int in 2..8, got {bits!r}")
        if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
            raise ValueError(f"{group_size_name} must be a positive int or -1 (per-channel), got {group_size!r}")

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
