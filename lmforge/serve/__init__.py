"""OpenAI-compatible HTTP serving over the continuous-batching engine, its metrics, and a load benchmark.

```python
from lmforge.serve import create_app, ServerThread
app = create_app(engine, tokenizer, "my-model", api_key=None)
with ServerThread(app) as server:           # or: uvicorn.run(app, host="127.0.0.1", port=8000)
    print(server.url)                       # point any OpenAI client at server.url + "/v1"
```
"""
from .app import create_app
from .async_engine import AsyncLLMEngine, EngineClosedError, EngineSnapshot
from .guard import ServeLimits
from .protocol import APIError
from .server import ServerThread, free_port

__all__ = ["create_app", "AsyncLLMEngine", "EngineClosedError", "EngineSnapshot", "ServeLimits", "APIError",
           "ServerThread", "free_port"]
