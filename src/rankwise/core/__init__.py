"""The machinery every method plugs into; it names no method."""
