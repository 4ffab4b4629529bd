"""PathGuard's gRPC predict-and-screen service."""
