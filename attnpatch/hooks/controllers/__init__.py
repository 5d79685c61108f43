"""Controllers: what to do with attention probabilities (observe, record, edit)."""

from .base import AttentionControl, ComposeControl
from .edit import ReweightCrossAttention
from .store import AttentionStore

__all__ = ["AttentionControl", "ComposeControl", "AttentionStore", "ReweightCrossAttention"]
