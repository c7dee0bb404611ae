"""The core process: token ids in, token ids out (scheduler, requests, stop checks)."""
