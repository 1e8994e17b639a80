//! Pure functions and strategies that combine clients' adapter updates into a global update (no I/O, no clock, no async).
