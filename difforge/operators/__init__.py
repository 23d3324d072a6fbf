"""The built-in operators, one per file, grouped by stage. They are declared as entry points
in the group `difforge.operators` of difforge's own `pyproject.toml`, exactly as plugins declare
theirs, and imported only when a pipeline names them: nothing is imported here."""
