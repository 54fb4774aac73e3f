"""mrpcd: the mrpc daemon."""

VERSION = "0.1.0"
