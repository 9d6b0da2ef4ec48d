"""One generic multiplexer of same-signature interfaces (the shared datapath's client select).

The encoder top puts exactly one client at a time on each shared port (the GEMM engine's command and
weight-streamer port, the row-table and e8 write ports, the buffers' side ports). :func:`mux_interfaces`
does it for any :class:`~amaranth.lib.wiring.Signature` once, member by member:

* members the *sources* drive (flow ``Out`` as seen from a source) are taken from the selected source
  (an AND-OR over the sources); with no source selected they are zero, so a stream is not valid and a
  write port not enabled;
* members the sources receive (flow ``In``) are broadcast; one-bit ones (``valid``, ``ready``,
  ``done``, ``busy``, ...) are gated so that every source but the selected one sees 0, as the datapath
  contract asks ("In-members to inactive clients carry valid=0/ready=0"). Wider ones (data) are passed
  ungated: nobody acts on them without a one-bit qualifier.

The select is one-hot, one bit per source (``owns``), and the caller gives registers: then each gate
in front of a client is a 2-input AND of that client's own flip-flop, which the synthesizer folds into
the client's first LUT, rather than a compare of a shared multi-bit select fanned out to every
client. The wide members' AND-OR may take a second set of select registers (``wide_owns``, e.g.
reset-less copies that a synthesizer cannot merge with the first): then the one-bit handshake gates,
which sit on the clients' control paths, hang on a flip-flop with a fanout of a few instead of one
that also selects every payload bit. The caller changes the select only while every client is idle (the sequencer switches
clients between instructions), so no stream transfer is ever split between two clients.
"""

from amaranth.hdl import Mux, Shape, Value
from amaranth.lib.wiring import Out

__all__ = ["mux_interfaces"]


def mux_interfaces(m, owns, sources, name=None, *, driven=(), wide_owns=None):
    """Multiplex ``sources`` (interfaces of one signature) onto a new interface of that signature.

    Parameters
    ----------
    m : Module
        Where the combinational logic goes.
    owns : sequence of Value
        One one-bit value per source, at most one high: the source that owns the returned interface
        (none high: no source). Flip-flops, for timing (see the module docstring).
    sources : list of interfaces
        Same signature (as seen from each source's owner: e.g. every client's ``client`` member).
    name : str or None
        Prefix of the returned interface's signals.
    driven : iterable of str
        Members (top-level names) whose every leaf the sources *drive* whatever their declared flow:
        a memory write port declared ``Out(memory.WritePort.Signature(...))`` on its writer (as
        :class:`~m3vit_hw.weights.client.GemmClientSignature` declares ``gelu_lut``) has ``In`` leaves
        although the writer drives them.
    wide_owns : sequence of Value or None
        The select of the driven members wider than one bit (the same one-hot value as ``owns``
        whenever a source's one-bit members can matter; other flip-flops, for fanout); ``None``:
        ``owns``.

    Returns
    -------
    interface
        An interface with the sources' signature: connect it where a single source would go (it
        drives what a source would drive and receives what a source would receive).

    Raises
    ------
    ValueError
        If ``sources`` is empty, their signatures differ, or ``owns`` is not one one-bit value per
        source.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("mux_interfaces needs at least one source")
    owns = [Value.cast(o) for o in owns]
    if len(owns) != len(sources) or any(len(o) != 1 for o in owns):
        raise ValueError(f"owns must be {len(sources)} one-bit values (one per source), "
                         f"not {len(owns)} of widths {[len(o) for o in owns]}")
    if wide_owns is None:
        wide_owns = owns
    wide_owns = [Value.cast(o) for o in wide_owns]
    if len(wide_owns) != len(sources) or any(len(o) != 1 for o in wide_owns):
        raise ValueError(f"wide_owns must be {len(sources)} one-bit values (one per source), "
                         f"not {len(wide_owns)} of widths {[len(o) for o in wide_owns]}")
    sig = sources[0].signature
    for i, s in enumerate(sources[1:], 1):
        if s.signature != sig:
            raise ValueError(f"source {i} has signature {s.signature!r}, source 0 {sig!r}")
    target = sig.create(path=(name,) if name else None)
    flat_t = {path: val for path, _, val in sig.flatten(target)}
    flows = [{path: (flow, val) for path, flow, val in sig.flatten(src)} for src in sources]
    driven = set(driven)
    for path, tval in flat_t.items():
        flow = Out if path[0] in driven else flows[0][path][0].flow
        vals = [f[path][1] for f in flows]
        if flow == Out:
            width = Shape.cast(tval.shape()).width
            sel = owns if width == 1 else wide_owns
            picked = [Mux(own, Value.cast(v), 0) for own, v in zip(sel, vals)]
            acc = picked[0]
            for x in picked[1:]:
                acc = acc | x
            m.d.comb += tval.eq(acc[:width])
        else:
            gate = Shape.cast(tval.shape()).width == 1
            for own, v in zip(owns, vals):
                m.d.comb += v.eq(own & tval if gate else tval)
    return target
