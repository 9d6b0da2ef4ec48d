"""The board backend: PYNQ's ``Overlay``, ``MMIO`` and ``allocate`` (imported only when constructed).

Not a test dependency: nothing in the package imports :mod:`pynq` at import time.
"""

import time

import numpy as np

from ..soc.regmap import FIELDS, OFFSETS

__all__ = ["PynqBackend"]


class PynqBackend:
    """Run the driver on a ZCU104 with PYNQ.

    Parameters
    ----------
    bitfile : str
        The ``.bit`` written by the build (its ``.hwh`` next to it).
    ip_name : str
        The accelerator's instance name in the block design.
    """

    def __init__(self, bitfile, *, ip_name="m3vit_accel_0"):
        try:
            import pynq
        except ImportError as e:
            raise ImportError("PynqBackend needs the pynq package (on the board: pip install pynq)") from e
        self._pynq = pynq
        self.overlay = pynq.Overlay(bitfile)
        ip = self.overlay.ip_dict[ip_name]
        self.mmio = pynq.MMIO(ip["phys_addr"], ip["addr_range"])
        self._bufs = {}

    def read(self, offset):
        return int(self.mmio.read(offset))

    def write(self, offset, value):
        self.mmio.write(offset, int(value))

    def alloc(self, name, nbytes):
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self._pynq.allocate(shape=(max(nbytes, 1),), dtype=np.uint8)
            self._bufs[name] = buf
        return int(buf.physical_address)

    def mem_write(self, name, data, offset=0):
        buf = self._bufs[name]
        buf[offset:offset + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)
        buf.flush()

    def mem_read(self, name, nbytes):
        buf = self._bufs[name]
        buf.invalidate()
        return bytes(buf[:nbytes])

    def wait_done(self, timeout_s):
        done = FIELDS[("STATUS", "DONE")].mask
        t0 = time.time()
        while not self.read(OFFSETS["STATUS"]) & done:
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"accelerator not done within {timeout_s} s")
