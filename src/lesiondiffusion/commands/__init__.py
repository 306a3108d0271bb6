"""CLI sub-commands, one module per area.

Each module defines ``register(subparsers)``, adding its sub-command(s) to the top-level parser.
``lesiondiffusion.cli`` discovers the modules here, so adding a command touches no shared file.
"""
