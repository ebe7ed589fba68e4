"""The serving benchmark (`make bench`, `python -m bench.run`): TorchServe with the project's
handler against the in-process limit, TorchServe's built-in handler and a Flask-style server."""
