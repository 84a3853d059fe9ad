"""Pure, fast tests: no server, no PostgreSQL process, no network. A package, so that a
file here may share its name with the feature tests of the same module in tests/."""
