"""Framework adapters (LlamaIndex, LangChain), each imported lazily from its own module."""
