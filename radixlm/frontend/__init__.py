"""The caller's process: text in, text out; reaches the core only through radixlm.messages."""
