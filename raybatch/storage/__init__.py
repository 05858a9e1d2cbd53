"""Storage: where a job's inputs come from and where its outputs, checkpoints and logs go.
Location strings are parsed by ``raybatch.spec.location`` (they are part of the job file).

- ``datastores``: the server's named datastores and their credential references;
- ``backends``: read/write a local directory or Azure Blob, with errors in words;
- ``staging``: the per-node, content-addressed input cache (``download`` mode);
- ``sync``: outputs, checkpoints and logs copied out while the job runs and at its end;
- ``plan``: what each node of an attempt writes locally and where it goes.
"""

from raybatch.spec.location import Location, LocationError, parse
from raybatch.storage.backends import Backend, Entry, StorageError, open_backend
from raybatch.storage.datastores import Access, CredentialError, Datastores

__all__ = ["Access", "Backend", "CredentialError", "Datastores", "Entry", "Location", "LocationError",
           "StorageError", "open_backend", "parse"]
