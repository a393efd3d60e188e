"""`workbench serve`: an OpenAI-compatible chat server for Qwen-VL-Chat and its adapters.

messages.py  OpenAI messages -> the ChatML prompt ids (client text never becomes an image tag)
images.py    image_url -> bounded, decoded, RGB image
models.py    the base model with its PEFT adapters, and how a batch picks its adapters
engine.py    the batching scheduler: left-padded prefill, KV-cache decoding, rows stop on their own
protocol.py  the OpenAI request/response schemas and error shape (pydantic)
app.py       the FastAPI routes and the playground page (static/playground.html)
server.py    uvicorn in the foreground (the CLI) or in a background thread (tests, bench)
bench.py     batched vs one-by-one throughput against a running server
"""
