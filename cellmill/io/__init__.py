"""Everything that touches files or the terminal: the store, the readers and writers, scratch
files, locks, progress bars, and fault injection for tests."""
