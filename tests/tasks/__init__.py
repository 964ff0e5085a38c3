"""Small tasks for tests, importable by peer processes as ``tests.tasks.<module>:<attr>``."""
