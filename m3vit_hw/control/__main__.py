"""``python -m m3vit_hw.control``: print or write the instruction format (see :func:`isa.main`)."""

from .isa import main

raise SystemExit(main())
