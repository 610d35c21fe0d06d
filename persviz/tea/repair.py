"""The test-time fixes side by side: ``persviz repair CONCEPT_DIR [--step k] [--write]`` (issue 26, docs/pick.md §5)."""
