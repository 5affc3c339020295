"""The `outcore` command line: one module per subcommand."""
