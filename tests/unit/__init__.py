"""Unit tests: pure logic, the pipeline with fake sides, and checks of the repository's own files."""
