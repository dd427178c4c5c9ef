"""Backend-specific implementations behind one seam: see sets.py (the kernel sets and how one
is chosen), reference.py (the oracle), cpu.py, fused.py, threefry.py."""
