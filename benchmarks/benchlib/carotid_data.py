"""The real carotid data set in ../shared and its fixed subject split.

Frames of one subject are nearly alike, so the split is by subject: the tuning subjects
train the model and tune every method's parameters; the test subjects are used only for
the reported figures.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

#: Held out for the reported figures (4 of 11 subjects, 135 of 404 images).
TEST_SUBJECTS = ("202201121752220024VAS", "202201121808450029VAS",
                 "202201121823380035VAS", "202201121837530038VAS")


def shared_dir() -> Optional[Path]:
    """The project's ../shared folder (or $SPECKLE2SELF_SHARED), if present."""
    env = os.environ.get("SPECKLE2SELF_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared")
    return next((c for c in candidates if c.is_dir()), None)


def carotid_dir() -> Optional[Path]:
    base = shared_dir()
    path = base / "data" / "carotid" if base else None
    return path if path and (path / "manifest.csv").is_file() else None


@dataclass(frozen=True)
class CarotidCase:
    image: Path
    mask: Optional[Path]
    subject: str

    def load(self):
        from PIL import Image
        image = np.array(Image.open(self.image).convert("L"))
        mask = np.array(Image.open(self.mask)).astype(bool) if self.mask else None
        return image, mask


def cases(split: str = "all", with_mask: bool = False) -> List[CarotidCase]:
    """Cases of the 'tuning', 'test' or 'all' split. Raises FileNotFoundError without ../shared."""
    root = carotid_dir()
    if root is None:
        raise FileNotFoundError("carotid data not found: expected ../shared/data/carotid beside the "
                                "checkout, or set SPECKLE2SELF_SHARED to the shared folder")
    if split not in ("tuning", "test", "all"):
        raise ValueError("split must be 'tuning', 'test' or 'all'")
    out = []
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            is_test = row["subject"] in TEST_SUBJECTS
            if (split == "test" and not is_test) or (split == "tuning" and is_test):
                continue
            mask = root / "masks" / row["file"] if row["has_mask"] == "1" else None
            if with_mask and mask is None:
                continue
            out.append(CarotidCase(root / "images" / row["file"], mask, row["subject"]))
    return out
