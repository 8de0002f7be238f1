"""Traces of a process's writes (``migrator track --record``): the model, the file, summaries,
and the pre-copy prediction they drive. Pure data and files: no kernel calls, no trio."""
