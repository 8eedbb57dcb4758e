"""The ``supra`` command."""
