"""The HTTP server: a thin layer over `Engine.async_generate` (no engine logic here).

    app.py                  FastAPI routes, OpenAI-compatible and native; `create_app(engine, ...)`
    protocol.py             pydantic request/response models: the only place request JSON is checked
    errors.py               OpenAI-style error bodies and the status-code table
    serving.py              shared by generating routes: server state, Engine streams, disconnects, SSE
    openai_completions.py   POST /v1/completions
    openai_chat.py          POST /v1/chat/completions
    native.py               POST /generate (SGLang's)
    metrics.py              Prometheus metrics for /metrics

Started by `radixlm serve` / `python -m radixlm.launch_server`.
"""
