"""Exchange adapters: one interface (``base.Exchange``), the paper exchange by default."""
