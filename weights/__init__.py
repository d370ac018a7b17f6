"""Checkpoint files: safe reading, splitting into networks, EMA selection and family detection.

Knows no model class: everything here works on `{key: tensor}` dicts and shapes.
"""
from weights.components import (
    EXTRA_KEYS, EXTRA_PREFIXES, PREFIXES, SCHEDULE_BUFFERS, Components, ema_name, ema_unet, has_ema,
    is_extra, is_lone_vae, schedule_buffers, split_components, sub_state,
)
from weights.errors import CheckpointError
from weights.families import FAMILIES, GENERATIONS, RULES, detect_family
from weights.reader import SUFFIXES, read_checkpoint, read_header, read_metadata

__all__ = [
    "CheckpointError", "Components", "EXTRA_KEYS", "EXTRA_PREFIXES", "FAMILIES", "GENERATIONS", "PREFIXES",
    "RULES", "SCHEDULE_BUFFERS", "SUFFIXES", "detect_family", "ema_name", "ema_unet", "has_ema", "is_extra",
    "is_lone_vae", "read_checkpoint", "read_header", "read_metadata", "schedule_buffers",
    "split_components", "sub_state",
]
