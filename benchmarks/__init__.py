"""Speed and memory benchmarks, side by side with peers; peer code (PyTorch) lives here only."""
