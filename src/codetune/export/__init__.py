"""Exports of a trained model: Hugging Face folders, GGUF files for llama.cpp/Ollama, and editor set-ups."""
