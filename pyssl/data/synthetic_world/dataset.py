"""A torch Dataset over cached synthetic sequences (samples or consecutive-frame pairs)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from .cache import load_frame, read_sequence_meta

_FLOW_KEYS = ("flow_fw", "flow_fw_valid", "flow_bw", "flow_bw_valid")
_LIST_KEYS = ("points", "point_labels")


def find_sequences(root) -> list[Path]:
    """``root`` itself if it holds a sequence (meta.json), else its sub-directories that do."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    seqs = sorted(p.parent for p in root.glob("*/meta.json"))
    if not seqs:
        raise FileNotFoundError(f"no synthetic-world sequences (meta.json) in {root} or its "
                                f"sub-directories; generate one with `pyssl data synth`")
    return seqs


class SyntheticWorldDataset(Dataset):
    """Cached sequences under ``root`` (one sequence directory, or a directory of them).

    ``mode="sample"``: item i is one frame's sample (keys in the package docstring).
    ``mode="pair"``: item i is frames (k, k+1) of one sequence: ``{"t0", "t1", "flow_fw",
    "flow_bw", "flow_fw_valid", "flow_bw_valid"}``. ``transform``, if given, is applied to
    each item. Batch with :func:`collate` (LiDAR points vary in number).
    """

    def __init__(self, root, mode: str = "sample", transform=None):
        if mode not in ("sample", "pair"):
            raise ValueError(f"mode must be 'sample' or 'pair', got {mode!r}")
        self.mode = mode
        self.transform = transform
        self.sequences = find_sequences(root)
        self.meta = []
        self.index: list[tuple[int, int]] = []
        for si, seq in enumerate(self.sequences):
            meta = read_sequence_meta(seq)
            if not meta.get("complete"):
                raise RuntimeError(f"{seq}: sequence is incomplete (generation interrupted?); "
                                   f"regenerate it")
            self.meta.append(meta)
            n = meta["frames"] - (1 if mode == "pair" else 0)
            self.index.extend((si, k) for k in range(n))
        self.camera_names = self.meta[0]["camera_names"]
        self.classes = self.meta[0]["classes"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        si, k = self.index[i]
        seq = self.sequences[si]
        if self.mode == "sample":
            item = {k_: v for k_, v in load_frame(seq, k).items() if k_ not in _FLOW_KEYS}
        else:
            a, b = load_frame(seq, k), load_frame(seq, k + 1)
            item = {"t0": {k_: v for k_, v in a.items() if k_ not in _FLOW_KEYS},
                    "t1": {k_: v for k_, v in b.items() if k_ not in _FLOW_KEYS},
                    "flow_fw": a["flow_fw"], "flow_bw": b["flow_bw"],
                    "flow_fw_valid": a["flow_fw_valid"], "flow_bw_valid": b["flow_bw_valid"]}
        return self.transform(item) if self.transform is not None else item


def collate(batch: list) -> dict:
    """Stacks samples / pairs into a batch: fixed-size tensors get a leading batch dimension;
    ``points`` and ``point_labels`` stay lists of per-sample tensors."""
    first = batch[0]
    if isinstance(first, dict):
        return {k: ([b[k] for b in batch] if k in _LIST_KEYS else collate([b[k] for b in batch]))
                for k in first}
    if isinstance(first, torch.Tensor):
        return torch.stack(batch)
    return default_collate(batch)
