"""Fault injection (issue 18, section 2): a seeded plan of faults at every boundary of a
real fleet, and the invariants it must keep. tests/chaos/README.md says how to run it."""
