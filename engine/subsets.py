"""Subset bitmasks over M representations or metrics.

Bit k of a mask is member k in run order; masks run from 1 to 2^M - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_MEMBERS = 24


def all_masks(num_members: int, *, max_size: int | None = None) -> np.ndarray:
    """Return every non-empty mask of `num_members` bits, ascending, as int64 [S].

    Args:
      num_members: M, 1 <= M <= MAX_MEMBERS.
      max_size: keep only masks with at most this many members.
    """
    if not 1 <= num_members <= MAX_MEMBERS:
        raise ValueError(f"num_members must be in [1, {MAX_MEMBERS}], got {num_members}.")
    masks = np.arange(1, 1 << num_members, dtype=np.int64)
    if max_size is not None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}.")
        masks = masks[popcount(masks) <= max_size]
    return masks


def popcount(masks: np.ndarray) -> np.ndarray:
    """Return the number of set bits of each mask, int64 with the shape of `masks`."""
    masks = np.asarray(masks, dtype=np.uint64)
    count = np.zeros(masks.shape, dtype=np.int64)
    for bit in range(64):
        count += ((masks >> np.uint64(bit)) & np.uint64(1)).astype(np.int64)
        if not (masks >> np.uint64(bit + 1)).any():
            break
    return count


def mask_members(mask: int, num_members: int) -> list[int]:
    """Return the member indices of `mask`, ascending."""
    return [k for k in range(num_members) if (int(mask) >> k) & 1]


def mask_of(members: Sequence[int]) -> int:
    mask = 0
    for k in members:
        mask |= 1 << int(k)
    return mask


def mask_label(mask: int, names: Sequence[str], sep: str = "+") -> str:
    """Return the members' names joined by `sep`, in run order."""
    return sep.join(names[k] for k in mask_members(mask, len(names)))


def parse_subset(text: str, names: Sequence[str]) -> int:
    """Parse 'a+b+c' (names) or an integer bitmask into a mask, validating against `names`."""
    text = text.strip()
    if text.isdigit():
        mask = int(text)
        if not 1 <= mask < (1 << len(names)):
            raise ValueError(f"subset mask {mask} is out of range [1, {(1 << len(names)) - 1}] "
                             f"for {len(names)} representations.")
        return mask
    members = []
    for part in text.split("+"):
        part = part.strip()
        if part not in names:
            raise ValueError(f"unknown representation {part!r} in subset {text!r}; valid names: {list(names)}.")
        index = names.index(part)
        if index in members:
            raise ValueError(f"representation {part!r} repeats in subset {text!r}; list each member once.")
        members.append(index)
    return mask_of(members)


def member_matrix(masks: np.ndarray, num_members: int) -> np.ndarray:
    """Return a 0/1 float32 matrix [S, M] whose row s marks the members of masks[s]."""
    masks = np.asarray(masks, dtype=np.int64)
    return ((masks[:, None] >> np.arange(num_members)[None, :]) & 1).astype(np.float32)
