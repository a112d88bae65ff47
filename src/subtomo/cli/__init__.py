"""Command-line interface: thin layer that parses, validates and dispatches jobs."""
