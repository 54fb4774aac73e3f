"""``null`` v2 for upgrade tests: the same policy under a new version number,
installed as a module (``--module tests.integration.engines.null_v2``)."""

from __future__ import annotations

from engines.null import NullPolicy


class NullPolicyV2(NullPolicy):
    VERSION = 2


ENGINE = NullPolicyV2
