"""Serving the gateway: the HTTP connection protocol and the process's own limits."""
