"""Model configuration: one frozen, hashable dataclass, usable as a static `jit` argument."""

from __future__ import annotations

import dataclasses
import enum


class RopeStyle(str, enum.Enum):
    """How the rotary embedding pairs up the dimensions of each head.

    ADJACENT_PAIR rotates (x[2i], x[2i+1]) — the layout of GGUF llama weights, whose q/k rows the HF→GGUF
    converter permuted. ROTATE_HALF rotates (x[i], x[i + d/2]) — the layout of HF safetensors weights."""

    ADJACENT_PAIR = "adjacent_pair"
    ROTATE_HALF = "rotate_half"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str  # "llama", "qwen2" or "gemma3"
    name: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    rope_theta: float
    rms_eps: float
    rope_style: RopeStyle
    tie_embeddings: bool
    qkv_bias: bool = False
    max_position: int = 8192
    # Gemma 3 (all neutral for Llama / Qwen2): layers in `local_layers` attend only to the last
    # `sliding_window` positions (the query's own included) and rotate with `rope_local_theta`; the others
    # are global and use `rope_theta`. Attention scores are scaled by query_pre_attn_scalar ** -0.5
    # (0: head_dim) and soft-capped to (-attn_softcap, attn_softcap) when attn_softcap > 0.
    sliding_window: int = 0
    local_layers: tuple[int, ...] = ()
    rope_local_theta: float = 0.0
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float = 0.0

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def attn_scale(self) -> float:
        """The factor on q.k attention scores."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_style"] = self.rope_style.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_style"] = RopeStyle(d["rope_style"])
        d["local_layers"] = tuple(d.get("local_layers", ()))  # JSON gives a list: keep the config hashable
        return cls(**d)
