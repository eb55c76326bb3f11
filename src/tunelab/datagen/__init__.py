"""Data from models: ``tunelab self-instruct`` and ``tunelab augment``.

``backend.py`` talks to a model, in-process or over an OpenAI-compatible API (the official
``openai`` client); ``rouge.py`` is ROUGE-L with an inverted index; ``filters.py`` the
self-instruct filters with their rejection counts; ``selfinstruct.py`` the loop of Wang et al.
(2022); ``augment.py`` paraphrase and back-translation with provenance.
"""
