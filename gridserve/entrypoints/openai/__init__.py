"""The OpenAI-compatible API: request/response models and the /v1/completions and /v1/chat/completions
handlers. The routes themselves are in gridserve.entrypoints.http_server."""
