"""The stages: each reads the run directory, computes its part, and writes what
`hardprobe.rundir.layout.STAGES` declares it owns (and nothing else)."""
