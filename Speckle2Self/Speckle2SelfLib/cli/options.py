"""Option types and helpers shared by the subcommands: every value is checked when it is parsed,
and a bad one is a one-line error naming what was expected."""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".zip")


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, why: str = ""):
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}{why}")
        return value
    parse.__name__ = f"whole number >= {low}"
    return parse


def int_between(low: int, high: int):
    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in {low}..{high}, got {value}")
        return value
    parse.__name__ = f"whole number in {low}..{high}"
    return parse


def float_between(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        value = _number(text)
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must lie in {bracket}{low:g}, {high:g}], got {text}")
        return value
    parse.__name__ = "number"
    return parse


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def scales_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and 0 < v <= 1) for v in values):
        raise argparse.ArgumentTypeError(f"scales must be numbers in (0, 1], got {text!r}")
    return values


def crop_size(text: str) -> int:
    value = _number(text, int)
    if value < 32 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 and at least 32, got {value}")
    if value > 4096:
        raise argparse.ArgumentTypeError(f"{value} is larger than any frame worth cropping (at most 4096)")
    return value


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)
