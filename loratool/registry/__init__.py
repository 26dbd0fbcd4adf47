"""The adapter registry: content-addressed blobs and a SQLite index under ``$LORATOOL_HOME``, with
the Hugging Face Hub as its remote.

    store.py   blobs/sha256/ab/cdef…: atomic writes, reads that check the digest, the store lock
    index.py   registry.db: schema migrations by user_version, WAL, transactions with retries
    core.py    ``Registry``: add, list (--fits), show, tag, rm, gc, verify, export, materialize
    refs.py    references (name, name@3, name:prod, sha256:…, hf://…): parsing only;
               ``loratool.resolve`` turns them into paths
    hub.py     download (adapter files only, into the HF cache), pull, push with a model card
    export.py  export in the registered format or converted
The typed results (``--json`` prints them) are in ``loratool.schemas.registry``.

Nothing is imported here: ``refs`` is parsed for every ``--adapters`` and must stay cheap to import.
"""
