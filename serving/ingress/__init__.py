"""The HTTP front door: auth, admission, routing and proxying to engine replicas."""
