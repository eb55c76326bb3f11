"""``tunelab serve``: a run (or a model) behind an OpenAI-compatible HTTP API.

``protocol.py`` validates chat-completion requests and shapes OpenAI responses; ``app.py`` is
the Starlette app with its bounded queue and generation worker; ``server.py`` loads the run and
runs uvicorn.
"""
