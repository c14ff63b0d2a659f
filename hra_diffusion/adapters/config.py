"""HRAConfig: the adapter's settings, a validated dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The official subject-driven targets: every attention projection of the UNet."""

CONTROL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
"""The official controllable-generation targets: attention projections plus the GEGLU input projection."""

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIPTextModel's attention projections (the text encoder has its own module names)."""


@dataclass
class HRAConfig:
    """Settings of an HRA adapter.

    r: number of Householder reflections per layer (even, for the identity init).
    target_modules: module-name suffixes to wrap (``"to_q"`` matches ``...attn1.to_q``).
    apply_gs: Gram-Schmidt variant (λ = ∞): H = I - 2QQᵀ. It cannot start at the identity, so it
        starts from a random orthogonal H and the adapted model does NOT equal the base at step 0.
    orth_lambda: weight λ of the orthogonality regulariser Σ ||I - ÛᵀÛ||_F² added to the loss.
    init_identity: symmetric init (u_{2k-1} = u_{2k}) so H = I at step 0. Set False to allow an
        odd r with a random, non-identity start.
    exclude_modules: module-name suffixes never wrapped, even if they match a target.
    train_bias: also train a shift of each wrapped layer's bias (layers without a bias get none), as PEFT's
        ``hra_bias="hra_only"``; starts at zero, so the adapted model still equals the base at step 0.
    seed: seed of the adapter init (None: draw from torch's global generator).
    """

    r: int = 8
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    apply_gs: bool = False
    orth_lambda: float = 0.0
    init_identity: bool = True
    exclude_modules: list[str] = field(default_factory=list)
    train_bias: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.target_modules = list(self.target_modules)
        self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"HRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"HRAConfig.target_modules must be a non-empty list of module-name suffixes, "
                f"got {self.target_modules!r}"
            )
        if not isinstance(self.orth_lambda, (int, float)) or self.orth_lambda < 0:
            raise ValueError(f"HRAConfig.orth_lambda must be a number >= 0, got {self.orth_lambda!r}")
        self.orth_lambda = float(self.orth_lambda)
        if self.apply_gs:
            # H = I - 2QQᵀ is never the identity; the init is random whatever init_identity says.
            self.init_identity = False
        elif self.init_identity and self.r % 2:
            raise ValueError(
                f"HRAConfig.r={self.r} is odd: the identity init pairs equal reflections, so r must be "
                f"even. Use r={self.r + 1} (or {self.r - 1}), or pass init_identity=False to start from "
                "a random, non-identity H."
                if self.r > 1
                else "HRAConfig.r=1 is odd: the identity init needs r even (e.g. r=2), "
                "or pass init_identity=False."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HRAConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HRAConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
