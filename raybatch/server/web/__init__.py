"""The web view: the queue, the jobs, one job's logs, files and metrics, a sweep's trials
and an array's items, as server-rendered HTML (Jinja2, autoescaped: names, commands and
paths are user text) behind the server's token. routes.py lists the pages, session.py
how a browser logs in, data.py where the pages' data comes from. No Node build step and no
CDN: the one script (static/logs.js) is plain JavaScript that follows a running job's logs."""

from raybatch.server.web.routes import router

__all__ = ["router"]
