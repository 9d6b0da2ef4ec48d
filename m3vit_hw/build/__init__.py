"""The ZCU104 build: ``python -m m3vit_hw.build`` (see :mod:`.__main__`) and its steps (:mod:`.flow`)."""

from .flow import run_build, synth_estimate

__all__ = ["run_build", "synth_estimate"]
