"""Fast, in-process tests (make test-fast runs those not marked slow)."""
