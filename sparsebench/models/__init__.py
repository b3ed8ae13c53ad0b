"""Model loading (registry GGUF packages, local folders, tiny random models) and architecture adapters."""
