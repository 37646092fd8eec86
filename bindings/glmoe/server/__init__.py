"""An OpenAI-compatible HTTP server (llama.cpp's llama-server flags and endpoints) on the
continuous-batching engine: `llama-server -m MODEL.gguf`."""
