"""The engine: spec, operator contract, datasets, planning, execution and tracking."""
