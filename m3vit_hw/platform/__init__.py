"""Board files (facts only: parts, pins, clocks)."""

from .zcu104 import ZCU104Platform

__all__ = ["ZCU104Platform"]
