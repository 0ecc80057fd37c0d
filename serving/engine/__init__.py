"""Engine side: the Ray Serve replica that owns one vLLM server, and its builder."""
