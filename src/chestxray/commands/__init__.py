"""Subcommands of the `chestxray` CLI, one module each."""
