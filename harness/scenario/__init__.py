"""The scenario: the typed, immutable model and how it is read from YAML (pure)."""
