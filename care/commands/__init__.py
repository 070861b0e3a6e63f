"""One module per `care` subcommand: `add_arguments(parser)` and `run(args) -> int`.

Modules here must import only light things at top level; heavy libraries are imported inside `run`.
"""
