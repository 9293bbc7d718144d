"""One module per console page; each has a ``router`` of ``web.ConsoleRoute`` routes under ``/console``."""
