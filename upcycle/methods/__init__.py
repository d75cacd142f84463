"""Conversion methods: `base.Method` and its hooks, one module per method, `registry.METHODS`."""
