"""One module per `msn` subcommand that is not a library module of its own."""
