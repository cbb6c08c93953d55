"""The OpenAI-compatible HTTP API of ``jserve serve --http-port``.

``app.build_app`` makes the FastAPI application over the gRPC server's
``ServingCore`` (same engine, metrics, drain); ``http_server.HTTPServer`` runs
it with uvicorn on the server's event loop. ``protocol`` holds the request
schemas, ``completions`` and ``chat`` the two generation endpoints,
``chat_template`` the model's template, ``errors`` OpenAI's error shape.
"""
