"""The netlist timing estimate; it lives in :mod:`m3vit_hw.build.timing` (the build report uses it
too, and ``m3vit_hw`` does not import ``sim``). Re-exported here for the synth report and older callers."""

from m3vit_hw.build.timing import DelayModel, Path, TimingResult, analyze, format_result

__all__ = ["DelayModel", "Path", "TimingResult", "analyze", "format_result"]
