"""``migrator``: the command line, one module per command over the public library.

``cli.main`` parses, dispatches to ``<command>.run(args)`` and turns every expected failure into one
line on stderr; ``options`` holds the option types several commands share (sizes, rates, tokens,
TLS). Nothing in the library imports this package.
"""
