"""What the tests and the benchmarks share to drive the real parts: rule files, waiting,
DCMTK's storescu, Part 10 files and /proc readings. One module per concept."""
