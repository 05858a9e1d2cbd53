"""The REST API's routes, one module per resource; each ``router(ctx)`` builds an
``APIRouter`` over the server's :class:`~raybatch.server.app.ServerContext`, and
``create_app`` mounts them under the API prefix (auth on all but ``health``)."""
