"""What the sandbox and the bridge share to serve HTTP: the threaded uvicorn server,
the signal loop and the ``/usage`` page."""
