"""Exports of a trained model: merged weights or an adapter, the model card, the Hub, GGUF for local runtimes."""
